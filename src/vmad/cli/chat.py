"""``vmad chat IMAGE``: a conversation about an image in the terminal, model loaded once.

The first turn asks the default answer-mode question (the paper's template with the object name,
``--class-name``) and prints the score, the answer, what the mask shows and where the mask and overlay were
written (``--out``, default ``chat_output``; named like ``vmad detect``'s: ``<image name>_mask.png``,
``<image name>_overlay.png``). Each following line is a question about the same image; the conversation so far
goes with it (:meth:`vmad.infer.detector.Detector.chat`). Commands:

- ``/image PATH``: switch to another image (a new conversation; its first turn is printed as above);
- ``/save DIR``: write the transcript (``transcript.json``, ``transcript.md``) and every turn's mask and
  overlay (``turn01_mask.png``, ``turn01_overlay.png``, ...) to DIR;
- ``/quit`` (or end of input): stop; ``/help``: the commands.

With standard input piped, one question (or command) is read per line, blank lines are skipped and each
question is echoed as ``you> ...`` so the output reads as a transcript. A line that fails (unreadable image,
unknown command) prints ``error: ...`` and the session goes on; piped, the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vmad.cli.options import add_interactive_options, interactive_config

if TYPE_CHECKING:
    import numpy as np

    from vmad.infer.calibration import Calibration
    from vmad.infer.detector import Detection, Detector, DetectorConfig

DEFAULT_OUT = "chat_output"
HELP = "commands: /image PATH (switch image), /save DIR (transcript and masks), /quit"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk about an image in the terminal: score, answer, mask, follow-up questions",
        description="Ask a VMAD model about an image, then ask follow-up questions that carry the "
        "conversation. The first answer comes with the score, the mask and the overlay (written to --out). "
        f"{HELP}. With standard input piped, one question or command per line.",
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to talk about")
    parser.add_argument(
        "--model",
        default="small",
        metavar="small|PATH",
        help="'small' (packaged weights) or a checkpoint folder",
    )
    parser.add_argument(
        "--class-name", metavar="NAME", help="object name for the questions (default 'object')"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"where the first turn's mask and overlay go ({DEFAULT_OUT})",
    )
    add_interactive_options(parser, "turn")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and the image, load the model, answer the first turn, then read questions."""
    from vmad.cli.detect import prepare_out_dir
    from vmad.data.io import image_shape
    from vmad.infer.calibration import Calibration
    from vmad.infer.detector import Detector, resolve_model_path

    config = _checked_config(args)
    weights = resolve_model_path(args.model)
    image_shape(Path(args.image))  # an unreadable image fails before the model loads
    out_dir = Path(args.out)
    prepare_out_dir(out_dir)
    calibration = Calibration.load(args.threshold_file) if args.threshold_file else None
    detector = Detector.from_pretrained(weights, config=config)
    detector.name = args.model
    apply_thresholds(detector, calibration, args.threshold_file, args.threshold)
    interactive = sys.stdin.isatty()
    session = ChatSession(detector, out_dir, args.class_name, args.alpha, echo=not interactive)
    session.open(Path(args.image))
    if interactive:
        print(HELP)
    failures = session.loop(_lines(interactive))
    return 2 if failures and not interactive else 0


def _checked_config(args: argparse.Namespace) -> DetectorConfig:
    from vmad.errors import VMADError

    config = interactive_config(args)
    if not 0.0 <= args.alpha <= 1.0:
        raise VMADError(f"--alpha must be in [0, 1], got {args.alpha}")
    return config


def apply_thresholds(
    detector: Detector, calibration: Calibration | None, where: str | None, threshold: float | None
) -> None:
    """Use a threshold file's verdict and mask thresholds (VMADError when it was made for another model);
    an explicit ``--threshold`` wins for the mask."""
    from dataclasses import replace

    if calibration is not None:
        detector.apply_calibration(calibration, str(where))
    if threshold is not None:
        detector.config = replace(detector.config, threshold=threshold).validate()


def _lines(interactive: bool) -> Iterator[str]:
    """Lines typed at a ``you>`` prompt, or read from piped standard input, until end of input."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


@dataclass
class Turn:
    """One question and answer about one image, with the image pixels the model saw."""

    image: Path
    question: str
    answer: str
    detection: Detection
    pixels: np.ndarray


class ChatSession:
    """The conversation state: the current image and its history, and every turn so far (for /save)."""

    def __init__(
        self,
        detector: Detector,
        out_dir: Path,
        class_name: str | None,
        alpha: float = 0.5,
        echo: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.detector, self.out_dir, self.class_name, self.alpha = detector, out_dir, class_name, alpha
        self.echo = echo
        self.stream = stream
        self.turns: list[Turn] = []
        self.history: list[tuple[str, str]] = []
        self.image: Path | None = None
        self.pixels: np.ndarray | None = None
        self._names: dict[str, Path] = {}

    def say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def loop(self, lines: Iterator[str]) -> int:
        """Handle every line until /quit or the end; returns the number of lines that failed."""
        from vmad.errors import VMADError

        failures = 0
        for line in lines:
            text = line.strip()
            if not text:
                continue
            try:
                if not self.handle(text):
                    break
            except VMADError as exc:
                failures += 1
                print(f"error: {exc}", file=sys.stderr, flush=True)
        return failures

    def handle(self, text: str) -> bool:
        """One line: a command or a question; False to stop."""
        from vmad.errors import VMADError

        command, _, rest = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/image":
            self.open(Path(_argument(rest, "/image PATH")))
        elif command == "/save":
            self.save(Path(_argument(rest, "/save DIR")))
        elif command.startswith("/"):
            raise VMADError(f"unknown command {command}; {HELP}")
        else:
            self.ask(text)
        return True

    def open(self, path: Path) -> None:
        """Switch to ``path``: detect with an answer, write its mask and overlay, print the first turn."""
        from vmad.data.io import read_image_bounded
        from vmad.web.outputs import preview_overlay, save_detection_images

        pixels, size = read_image_bounded(path, self.detector.config.max_pixels)
        [det] = self.detector.detect([pixels], answer=True, class_name=self.class_name, original_sizes=[size])
        mask_path, overlay_path = self._output_paths(path)
        preview = preview_overlay(pixels, det, self.alpha)
        save_detection_images(pixels, det, mask_path, overlay_path, self.alpha, preview)
        self.image, self.pixels = path, pixels
        answer = det.answer or ""
        self.history = [(det.question, answer)]
        self.turns.append(Turn(path, det.question, answer, det, pixels))
        source = "the answer's <seg>" if det.mask_from == "answer" else "the segmentation question"
        note = (
            f", processed at {det.processed_size[1]} x {det.processed_size[0]}" if det.processed_size else ""
        )
        self.say(f"image   {path} ({size[1]} x {size[0]}{note})")
        self.say(f"asked   {det.question}")
        self.say(
            f"score   {det.anomaly_score:.4f}   mask {100.0 * float(det.mask.mean()):.2f} % of the image "
            f"(from {source})"
        )
        if det.verdict is not None:
            self.say(f"verdict {det.verdict} (anomalous when the score is > {det.image_threshold:.4f})")
        self.say(f"vmad>   {answer}")
        self.say(f"mask    {det.mask_description}")
        self.say(f"wrote   {mask_path} and {overlay_path}")

    def ask(self, question: str) -> None:
        """A follow-up question about the current image, with the conversation so far."""
        from vmad.errors import VMADError

        if self.image is None or self.pixels is None:
            raise VMADError("no image: use /image PATH first")
        if self.echo:
            self.say(f"you>    {question}")
        turn = self.detector.chat(self.image, self.history, question, class_name=self.class_name)
        self.history = list(turn.history)
        self.turns.append(Turn(self.image, question, turn.answer, turn.detection, self.pixels))
        self.say(f"vmad>   {turn.answer}")

    def _output_paths(self, path: Path) -> tuple[Path, Path]:
        """``out/<name>_mask.png`` and ``_overlay.png``; a second image of the same name (another folder)
        gets ``~2``, ``~3`` ... as in ``vmad detect``."""
        from vmad.cli.detect import output_paths

        name, n = path.name, 1
        while name.casefold() in self._names and self._names[name.casefold()] != path.resolve():
            n += 1
            name = f"{path.name}~{n}"
        self._names[name.casefold()] = path.resolve()
        mask, overlay = output_paths(Path(name))
        return self.out_dir / mask, self.out_dir / overlay

    def save(self, folder: Path) -> None:
        """Write the transcript and every turn's mask and overlay to ``folder``."""
        from vmad.atomic import write_json_atomic, write_text_atomic
        from vmad.cli.detect import prepare_out_dir
        from vmad.web.outputs import save_detection_images

        prepare_out_dir(folder)
        records = []
        for number, turn in enumerate(self.turns, start=1):
            mask, overlay = f"turn{number:02d}_mask.png", f"turn{number:02d}_overlay.png"
            save_detection_images(turn.pixels, turn.detection, folder / mask, folder / overlay, self.alpha)
            records.append(_record(number, turn, mask, overlay))
        data = {"model": self.detector.name, "class_name": self.class_name, "turns": records}
        write_json_atomic(folder / "transcript.json", data, allow_nan=False, fsync=False)
        write_text_atomic(folder / "transcript.md", _markdown(data), fsync=False)
        self.say(f"saved   {len(records)} turn(s) to {folder} (transcript.json, transcript.md, masks)")


def _argument(rest: str, usage: str) -> str:
    from vmad.errors import VMADError

    if not rest.strip():
        raise VMADError(f"missing argument: {usage}")
    return rest.strip()


def _record(number: int, turn: Turn, mask: str, overlay: str) -> dict[str, Any]:
    det = turn.detection
    return {
        "turn": number,
        "image": str(turn.image),
        "question": turn.question,
        "answer": turn.answer,
        "score": round(float(det.anomaly_score), 6),
        "verdict": det.verdict,
        "mask_from": det.mask_from,
        "mask_description": det.mask_description,
        "mask": mask,
        "overlay": overlay,
    }


def _markdown(data: dict[str, Any]) -> str:
    """The transcript as Markdown: one section per turn with its question, answer, score and mask."""
    lines = [
        "# vmad chat transcript",
        "",
        f"Model: {data['model']}; object: {data['class_name'] or 'object'}",
        "",
    ]
    for r in data["turns"]:
        lines += [
            f"## Turn {r['turn']}: {r['image']}",
            "",
            f"**You:** {r['question']}",
            "",
            f"**vmad:** {r['answer']}",
            "",
            f"Score {r['score']:.4f}; {r['mask_description']} Mask `{r['mask']}`, overlay `{r['overlay']}`.",
            "",
        ]
    return "\n".join(lines)
