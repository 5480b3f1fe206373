"""Images: saving with infotext, image operations, grids, the infotext format."""
