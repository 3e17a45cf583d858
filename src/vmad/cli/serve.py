"""``vmad serve``: the web page (Gradio; the ``web`` extra) over one model loaded once.

Binds 127.0.0.1 unless ``--host`` says otherwise; no share link, analytics off (:mod:`vmad.web.app`). The
options are checked, Gradio's presence and the port's availability too, before the model loads. The files
offered for download live in ``--work-dir`` (default: a temporary folder removed when the server stops).
Examples on the page: ``--examples DIR``, else ``examples/images`` of the current folder or of the source
checkout when there is one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from vmad.cli.options import add_interactive_options, interactive_config

if TYPE_CHECKING:
    from vmad.infer.detector import DetectorConfig
    from vmad.web.limits import UploadLimits

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="a web page: upload an image, see the mask, score and answer, ask follow-ups; batches",
        description="Serve a web page (Gradio) with the model loaded once: upload an image or pick an "
        "example, see the overlay, mask, score and answer, ask follow-up questions, download the mask "
        "and the JSON; a batch tab takes several images or a zip. Needs the web extra: "
        "pip install -e '.[web]'.",
    )
    parser.add_argument(
        "--model",
        default="small",
        metavar="small|PATH",
        help="'small' (packaged weights) or a checkpoint folder",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (7860)")
    parser.add_argument("--examples", metavar="DIR", help="folder of example images shown on the page")
    parser.add_argument("--work-dir", metavar="DIR", help="folder for the files offered for download")
    parser.add_argument("--max-file-mb", type=float, default=20.0, help="largest image upload in MB (20)")
    parser.add_argument("--max-zip-mb", type=float, default=200.0, help="largest zip upload in MB (200)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=64_000_000,
        metavar="N",
        help="refuse images with more than N pixels (64000000)",
    )
    parser.add_argument(
        "--max-batch-files",
        type=int,
        default=100,
        metavar="N",
        help="most images per batch, zip contents included (100)",
    )
    add_interactive_options(parser, "image")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check everything cheap first (Gradio, options, weights, port, examples), then load and serve."""
    import shutil
    import sys

    from vmad.cli.chat import apply_thresholds
    from vmad.infer.calibration import Calibration
    from vmad.infer.detector import Detector, resolve_model_path
    from vmad.web.app import import_gradio, launch
    from vmad.web.service import WebService

    import_gradio()
    limits, config = _checked_settings(args)
    weights = resolve_model_path(args.model)
    check_port_free(args.host, args.port)
    examples = find_examples(args.examples)
    work_dir = Path(args.work_dir) if args.work_dir else None
    calibration = Calibration.load(args.threshold_file) if args.threshold_file else None
    detector = Detector.from_pretrained(weights, config=config)
    detector.name = args.model
    apply_thresholds(detector, calibration, args.threshold_file, args.threshold)
    service = WebService(detector, limits, work_dir, args.alpha)
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: --host {args.host} makes the page reachable from other machines, without a password",
            file=sys.stderr,
        )
    try:
        launch(service, args.host, args.port, examples, on_ready=lambda url: _ready(args.model, url))
    finally:
        if work_dir is None:
            shutil.rmtree(service.work_dir, ignore_errors=True)
    return 0


def _checked_settings(args: argparse.Namespace) -> tuple[UploadLimits, DetectorConfig]:
    from vmad.errors import VMADError
    from vmad.web.limits import MB, UploadLimits

    if not 1 <= args.port <= 65535:
        raise VMADError(f"--port must be in 1..65535, got {args.port}")
    if not 0.0 <= args.alpha <= 1.0:
        raise VMADError(f"--alpha must be in [0, 1], got {args.alpha}")
    for name in ("max_file_mb", "max_zip_mb"):
        if getattr(args, name) <= 0:
            raise VMADError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    limits = UploadLimits(
        max_file_bytes=int(args.max_file_mb * MB),
        max_image_pixels=args.max_image_pixels,
        max_batch_files=args.max_batch_files,
        max_zip_bytes=int(args.max_zip_mb * MB),
    ).validate()
    config = interactive_config(args)
    return limits, config


def _ready(model: str, url: str) -> None:
    print(f"vmad serve: model {model} ready at {url} (Ctrl-C to stop)", flush=True)


def check_port_free(host: str, port: int) -> None:
    """VMADError when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    import socket

    from vmad.errors import VMADError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise VMADError(f"--host {host}: not a known address ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            raise VMADError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port"
            ) from None


def find_examples(folder: str | None) -> list[Path]:
    """The example images: every image directly in ``folder``; without it, ``examples/images`` of the
    current folder or of the source checkout, or none. VMADError when ``folder`` holds no image."""
    import vmad
    from vmad.data.io import list_images
    from vmad.errors import VMADError

    if folder is not None:
        images = list_images(Path(folder))
        if not images:
            raise VMADError(f"--examples {folder}: no image files in this folder")
        return images
    for candidate in (
        Path("examples/images"),
        Path(vmad.__file__).resolve().parents[2] / "examples" / "images",
    ):
        images = list_images(candidate)
        if images:
            return images
    return []
