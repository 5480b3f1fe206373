"""Loading shared by the transformer families (Flux.1, SD 3.5): a diffusers folder, one file holding everything,
or a transformer file with its other components chosen as "additional modules".

A family keeps what is its own (how a file's tensors split into components, how a module file is identified,
which components it cannot run without and how each is built); this module reads the files, puts each module in
place of its component and writes the "missing component" message, which names the file and the folder to fill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.models.checkpoints import ModelFamily, read_state_dict

#: Weights of one component, by tensor name.
Weights = dict[str, torch.Tensor]
#: A component's name -> (what users call it, a file like it, the model folder kind it is kept in).
Components = Mapping[str, tuple[str, str, str]]


def load_folder_or_file(path: Path, pipeline_class: Any, family: str, from_file: Callable[..., tuple[Any, Any]], *,
                        torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
                        search: dict[str, Sequence[Path]] | None = None) -> tuple[Any, ModelFamily]:
    """A flow-matching model of ``family`` from a diffusers folder (``pipeline_class.from_pretrained``) or, for
    a file, ``from_file`` with the additional ``modules`` and the model ``search`` folders."""
    path = Path(path)
    if path.is_dir():
        pipe = pipeline_class.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        return pipe, ModelFamily(family, False, "flow", path)
    return from_file(path, torch_dtype=torch_dtype, cache_dir=cache_dir, modules=modules, search=search)


def read_components(path: Path, modules: Sequence[Path], split: Callable[[Weights], dict[str, Weights]],
                    read_module: Callable[[Path], tuple[str, Weights]],
                    ) -> tuple[dict[str, Weights], dict[str, Path], list[tuple[str, Weights, Path]]]:
    """(parts, sources, others): the components of the file at ``path`` (``split`` of its tensors), each module
    file (``read_module`` -> (kind, weights)) put in place of the component it holds, and the file each
    component came from. Modules of a kind that names no component (SD 3.5's "clip", L or G) are ``others``,
    in their order, for the family to place."""
    parts = split(read_state_dict(path))
    sources = dict.fromkeys(parts, Path(path))
    others: list[tuple[str, Weights, Path]] = []
    for module in map(Path, modules):
        kind, weights = read_module(module)
        if kind in parts:
            parts[kind], sources[kind] = weights, module
        else:
            others.append((kind, weights, module))
    return parts, sources, others


def require_components(parts: Mapping[str, Weights], path: Path, *, label: str, transformer_key: str,
                       required: Components, search: Mapping[str, Sequence[Path]], article: str = "a") -> None:
    """ValueError unless ``parts`` hold the transformer (its tensor ``transformer_key``) and every ``required``
    component; messages name the family by ``label`` ("Flux.1"), after ``article`` ("an SD 3.5 model")."""
    if transformer_key not in parts["transformer"]:
        raise ValueError(f"{path}: no {label} transformer weights ({transformer_key})")
    for component, (what, example, kind) in required.items():
        if not parts[component]:
            folders = ", ".join(str(folder) for folder in search.get(kind, ())) or f"models/{kind}"
            raise ValueError(
                f"{path} is {article} {label} model without its {what}: put a file like {example} into {folders} "
                f"and choose it in the top bar's \"VAE / Text Encoder\" list (request field additional_modules)")
