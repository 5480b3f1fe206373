"""Command-line flags users know from A1111 (docs/compatibility.md §4), parsed once into a frozen :class:`Flags`.

Standard library only: ``launch.py`` parses flags before the virtual environment exists.
Flags are read from ``COMMANDLINE_ARGS`` first, then from the command line, which wins.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.settings import EngineSettings, Paths

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Flags:
    """Everything the command line says. Secrets (auth strings) are never printed: see :meth:`public`."""

    listen: bool = False
    port: int | None = None
    server_name: str | None = None
    share: bool = False
    api: bool = False
    nowebui: bool = False
    api_auth: str | None = None
    gradio_auth: str | None = None
    gradio_auth_path: str | None = None
    data_dir: str = str(ROOT)
    models_dir: str | None = None
    ckpt_dir: str | None = None
    ckpt: str | None = None
    vae_dir: str | None = None
    lora_dir: str | None = None
    controlnet_dir: str | None = None
    esrgan_models_path: str | None = None
    gfpgan_models_path: str | None = None
    codeformer_models_path: str | None = None
    allowed_dir: tuple[str, ...] = ()
    default_model_url: str | None = None
    medvram: bool = False
    lowvram: bool = False
    no_half: bool = False
    no_half_vae: bool = False
    precision: str = "autocast"
    use_cpu: tuple[str, ...] = ()
    device_id: str | None = None
    autolaunch: bool = False
    enable_insecure_extension_access: bool = False
    extensions_dir: str | None = None
    disable_all_extensions: bool = False
    disable_extra_extensions: bool = False
    cors_allow_origins: str | None = None
    cors_allow_origins_regex: str | None = None
    tls_keyfile: str | None = None
    tls_certfile: str | None = None
    max_body_size: int = 64
    max_image_pixels: int = 16384 * 16384
    queue_size: int = 64
    workers: int = 0
    ray_address: str | None = None
    allowed_hosts: str | None = None
    skip_install: bool = False
    test: bool = False
    test_args: tuple[str, ...] = field(default_factory=tuple)

    SECRET_FIELDS = ("api_auth", "gradio_auth")

    @property
    def host(self) -> str:
        """The address to bind: --server-name, else 0.0.0.0 with --listen, else loopback."""
        return self.server_name or ("0.0.0.0" if self.listen else "127.0.0.1")

    @property
    def server_port(self) -> int:
        return self.port or (7861 if self.nowebui else 7860)

    def public(self) -> dict[str, object]:
        """The flags as a dict with secrets masked, for logs and `/sdapi/v1/cmd-flags`."""
        values = asdict(self)
        for name in self.SECRET_FIELDS:
            if values.get(name):
                values[name] = "***"
        return values

    def paths(self) -> Paths:
        """Model and output folders from --data-dir, --models-dir and the per-kind folder flags."""
        base = Paths.under(self.data_dir, self.models_dir)
        extra = {
            kind: (Path(folder).resolve(),)
            for kind, folder in (
                ("checkpoint", self.ckpt_dir), ("vae", self.vae_dir), ("lora", self.lora_dir),
                ("controlnet", self.controlnet_dir), ("esrgan", self.esrgan_models_path),
                ("gfpgan", self.gfpgan_models_path), ("codeformer", self.codeformer_models_path),
            )
            if folder
        }
        allowed = tuple(Path(folder).expanduser().resolve() for folder in self.allowed_dir)
        return Paths(data_dir=base.data_dir, models_dir=base.models_dir, outputs_dir=base.outputs_dir,
                     extra_dirs=extra, allowed_dirs=allowed)

    def engine_settings(self, checkpoint_cache: int = 1) -> EngineSettings:
        """The engine's settings these flags describe."""
        cpu = "all" in self.use_cpu or "sd" in self.use_cpu
        device = "cpu" if cpu else (f"cuda:{self.device_id}" if self.device_id else "auto")
        precision = "full" if (self.no_half or self.precision == "full") else "auto"
        memory = "lowvram" if self.lowvram else "medvram" if self.medvram else "normal"
        return EngineSettings(paths=self.paths(), device=device, precision=precision,
                              no_half_vae=self.no_half_vae, memory_mode=memory,
                              checkpoint_cache=checkpoint_cache, default_checkpoint=self.ckpt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Stable Diffusion web UI and A1111-compatible API.")
    add = p.add_argument
    add("--listen", action="store_true", help="Serve on 0.0.0.0 so other machines can connect.")
    add("--port", type=int, help="Port to serve on (7860; 7861 with --nowebui).")
    add("--server-name", help="Address or host name to bind.")
    add("--share", action="store_true", help="Open a public Gradio share link.")
    add("--api", action="store_true", help="Serve the /sdapi/v1 API beside the UI.")
    add("--nowebui", action="store_true", help="Serve only the API.")
    add("--api-auth", help="HTTP Basic credentials for the API: user:pass[,user2:pass2].")
    add("--gradio-auth", help="Login for the UI: user:pass[,user2:pass2].")
    add("--gradio-auth-path", help="File with UI logins, one user:pass per line or comma separated.")
    add("--data-dir", default=str(ROOT), help="Folder for models/, outputs/, config.json and the rest.")
    add("--models-dir", help="Folder holding the model sub-folders (default: DATA_DIR/models).")
    add("--ckpt-dir", help="An extra folder of checkpoints.")
    add("--ckpt", help="Checkpoint to load at start.")
    add("--vae-dir", help="An extra folder of VAEs.")
    add("--lora-dir", help="An extra folder of LoRAs.")
    add("--controlnet-dir", help="An extra folder of ControlNet models.")
    add("--esrgan-models-path", help="An extra folder of ESRGAN upscalers.")
    add("--gfpgan-models-path", help="An extra folder of GFPGAN models (and the face detector).")
    add("--codeformer-models-path", help="An extra folder of CodeFormer models.")
    add("--allowed-dir", action="append", default=[], metavar="PATH",
        help="A folder users may save images into and read images from (output folder options, Extras' "
        "Batch from Directory), besides the data dir and the model folders; repeat for several.")
    add("--default-model-url", help="The checkpoint the UI's Download button fetches when there is none "
        "(default: SD 1.5 from Hugging Face, or default_model_url in config.json); the UI and the API cannot "
        "change it.")
    add("--medvram", action="store_true", help="Keep only the running model part on the GPU (model CPU offload).")
    add("--lowvram", action="store_true", help="Move layers to the GPU one at a time (sequential CPU offload).")
    add("--no-half", action="store_true", help="Run models in fp32.")
    add("--no-half-vae", action="store_true", help="Run the VAE in fp32.")
    add("--precision", choices=("full", "half", "autocast"), default="autocast", help="Model precision.")
    add("--use-cpu", nargs="+", default=[], help="Run on the CPU: 'all' (or module names).")
    add("--device-id", help="CUDA device index to use.")
    add("--autolaunch", action="store_true", help="Open the UI in the default browser.")
    add("--enable-insecure-extension-access", action="store_true", help="Allow installing extensions remotely.")
    add("--extensions-dir", help="Folder of third-party extensions (default: the extensions/ folder of the app).")
    add("--disable-all-extensions", action="store_true", help="Load no extension, built-ins included.")
    add("--disable-extra-extensions", action="store_true", help="Load only the built-in extensions.")
    add("--cors-allow-origins", help="Comma-separated origins allowed by CORS.")
    add("--cors-allow-origins-regex", help="Regular expression of origins allowed by CORS.")
    add("--tls-keyfile", help="TLS key file for HTTPS.")
    add("--tls-certfile", help="TLS certificate file for HTTPS.")
    add("--max-body-size", type=int, default=64, help="Largest request body (and UI upload) in MiB; more gets 413.")
    add("--max-image-pixels", type=int, default=16384 * 16384,
        help="Most pixels of an image the server decodes or makes (width x height); more gets 422.")
    add("--queue-size", type=int, default=64, help="Most jobs that may wait in the queue; more get 503.")
    add("--workers", type=int, default=0, metavar="N",
        help="Run jobs on a pool of N engine replicas (Ray, installed from requirements-ray.txt): one per local "
        "GPU, or N CPU replicas without GPUs; 0 with --ray-address: one per GPU of the cluster.")
    add("--ray-address", metavar="ADDR",
        help="Join the Ray cluster at ADDR (e.g. ray://head:10001 or head:6379) and run jobs on engine replicas "
        "placed on its GPU nodes (--workers N of them).")
    add("--allowed-hosts", help="With --listen: more host names (comma-separated, *.example.com allowed) the "
        "Host header may carry besides this machine's names and addresses.")
    add("--skip-install", action="store_true", help="Do not create or update the virtual environment.")
    add("--test", action="store_true", help="Run the test suite (arguments after it go to pytest).")
    return p


def parse_flags(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Flags:
    """Flags from ``COMMANDLINE_ARGS`` and ``argv``; with --test, what follows goes to pytest."""
    environ = os.environ if environ is None else environ
    args = shlex.split(environ.get("COMMANDLINE_ARGS", "")) + list(argv or [])
    test_args: list[str] = []
    if "--test" in args:
        i = args.index("--test")
        args, test_args = args[: i + 1], args[i + 1 :]
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.workers < 0:
        parser.error(f"--workers: must be 0 or more (0 with --ray-address: one per GPU), got {ns.workers}")
    values = {k: v for k, v in vars(ns).items()}
    values["use_cpu"] = tuple(values["use_cpu"])
    values["allowed_dir"] = tuple(values["allowed_dir"])
    return Flags(**values, test_args=tuple(test_args))
