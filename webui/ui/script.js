// Ctrl+Enter (Cmd+Enter on macOS) presses Generate of the tab on screen, as in A1111.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  for (const tab of ["txt2img", "img2img"]) {
    const button = document.getElementById(tab + "_generate");
    if (button && button.offsetParent !== null) {
      event.preventDefault();
      button.click();
      return;
    }
  }
});
