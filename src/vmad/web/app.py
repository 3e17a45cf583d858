"""The Gradio page of ``vmad serve``: one image with chat, and a batch tab, over a :class:`WebService`.

Imported only by ``vmad serve`` (Gradio is an optional extra, ``pip install -e ".[web]"``). Settings
(OURS): analytics off (``GRADIO_ANALYTICS_ENABLED=False`` before Gradio is imported, and per Blocks), no
share link, no MCP server, no monitoring endpoint, no run history, client-side rendering; requests queued
and run one at a time (the model is loaded once, in the service); uploads over
``UploadLimits.max_upload_bytes`` are refused by Gradio itself, the rest by :mod:`vmad.web.limits` with a
message in the page's status line (and a toast) while the server keeps serving.

Element ids for scripts and the browser test: ``vmad-upload``, ``vmad-class``, ``vmad-status``,
``vmad-overlay``, ``vmad-mask``, ``vmad-score``, ``vmad-answer``, ``vmad-description``, ``vmad-downloads``,
``vmad-chat``, ``vmad-question``, ``vmad-ask``; batch tab: ``vmad-batch-files``, ``vmad-batch-answers``,
``vmad-batch-run``, ``vmad-batch-status``, ``vmad-gallery``, ``vmad-table``, ``vmad-csv``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from vmad.errors import VMADError
from vmad.web.service import BATCH_COLUMNS, WebService

GRADIO_HINT = 'vmad serve needs Gradio: pip install -e ".[web]" (or make install)'


def import_gradio() -> ModuleType:
    """Gradio with analytics switched off before its first import; VMADError when it is not installed."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as exc:
        raise VMADError(f"{GRADIO_HINT} ({exc})") from None
    return gradio


def build_app(service: WebService, examples: Sequence[Path] = ()) -> Any:
    """The page (a ``gradio.Blocks``) over ``service``; ``examples`` are image files offered as examples."""
    gr = import_gradio()
    limits = service.limits.describe()
    # uploads Gradio stored are deleted after an hour (checked hourly), like the service's own files
    with gr.Blocks(title="vmad", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"## vmad: anomaly detection with a multimodal LLM\nModel **{service.detector.name}**. Upload "
            f"an image or pick an example: the overlay, the mask, the score and the answer appear; then ask "
            f"follow-up questions. Limits: {limits}."
        )
        with gr.Tab("Image"):
            _image_tab(gr, service, examples)
        with gr.Tab("Batch"):
            _batch_tab(gr, service)
    return demo


def _image_tab(gr: ModuleType, service: WebService, examples: Sequence[Path]) -> None:
    """Upload, results side by side, downloads, and the chat box."""
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_count="single", type="filepath", elem_id="vmad-upload")
            class_name = gr.Textbox(
                label="Object name (optional)", placeholder="e.g. bottle, brick", elem_id="vmad-class"
            )
            detect = gr.Button("Detect again", elem_id="vmad-detect")
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[upload], label="Bundled examples")
            status = gr.Markdown(elem_id="vmad-status")
        with gr.Column(scale=2), gr.Row():
            overlay, mask = (
                gr.Image(
                    label=label,
                    format="png",
                    interactive=False,
                    elem_id=f"vmad-{label.lower()}",
                    buttons=["download", "fullscreen"],
                    image_mode=mode,
                )
                for label, mode in (("Overlay", "RGB"), ("Mask", "L"))
            )
    with gr.Row():
        score = gr.Textbox(label="Anomaly score", interactive=False, elem_id="vmad-score", scale=1)
        answer = gr.Textbox(label="Answer", interactive=False, elem_id="vmad-answer", scale=3)
    description = gr.Textbox(
        label="What the mask shows (computed from the mask)", interactive=False, elem_id="vmad-description"
    )
    downloads = gr.File(
        label="Downloads: mask PNG, overlay PNG, JSON",
        file_count="multiple",
        interactive=False,
        elem_id="vmad-downloads",
    )
    chat = gr.Chatbot(
        label="Conversation", elem_id="vmad-chat", height=320, feedback_options=None, buttons=["copy"]
    )
    with gr.Row():
        question = gr.Textbox(
            show_label=False,
            scale=4,
            elem_id="vmad-question",
            placeholder="Ask a follow-up: where exactly? how severe is it? what should we do?",
        )
        ask = gr.Button("Ask", variant="primary", scale=1, elem_id="vmad-ask")
    state = gr.State(None)

    on_image, on_ask = partial(_analyze, gr, service), partial(_ask, gr, service)
    results = [overlay, mask, score, answer, description, downloads, chat, state, status]
    upload.change(on_image, [upload, class_name], results)
    detect.click(on_image, [upload, class_name], results)
    for event in (ask.click, question.submit):
        event(on_ask, [question, chat, state], [question, chat, state, status])


def _analyze(gr: ModuleType, service: WebService, path: str | None, class_name: str) -> tuple[Any, ...]:
    """Outputs of the image tab for an upload (cleared outputs and a message when refused)."""
    empty = (None, None, "", "", "", None, [], None)
    if not path:
        return (*empty, "")
    try:
        a = service.analyze(path, class_name)
    except VMADError as exc:
        gr.Warning(str(exc), title="Refused")
        return (*empty, f"**Refused.** {exc}")
    chat = [{"role": "user", "content": a.state["history"][0][0]}, {"role": "assistant", "content": a.answer}]
    verdict = f" ({a.verdict})" if a.verdict else ""
    status = f"**Done:** {a.state['name']}, score {a.score:.4f}{verdict}." + (f" {a.note}" if a.note else "")
    files = [str(p) for p in a.files]
    return a.overlay, a.mask, f"{a.score:.4f}{verdict}", a.answer, a.description, files, chat, a.state, status


def _ask(
    gr: ModuleType, service: WebService, question: str, history: list[dict[str, str]], state: dict | None
) -> tuple[Any, ...]:
    """Outputs of a follow-up question: the box cleared, the chat extended, the state updated."""
    try:
        reply, state = service.follow_up(state, question)
    except VMADError as exc:
        gr.Warning(str(exc), title="Cannot ask")
        return question, history, state, f"**Not asked.** {exc}"
    turn = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": reply}]
    return "", [*(history or []), *turn], state, f"**Answered** ({len(state['history'])} turns)."


def _batch_tab(gr: ModuleType, service: WebService) -> None:
    """Several images or a zip -> progress, gallery, table, CSV."""
    files = gr.File(
        label="Images or a .zip of images", file_count="multiple", type="filepath", elem_id="vmad-batch-files"
    )
    with gr.Row():
        class_name = gr.Textbox(label="Object name (optional)", elem_id="vmad-batch-class", scale=3)
        answers = gr.Checkbox(
            label="Generate answers (slower)", value=True, elem_id="vmad-batch-answers", scale=1
        )
        run = gr.Button("Run batch", variant="primary", elem_id="vmad-batch-run", scale=1)
    status = gr.Markdown(elem_id="vmad-batch-status")
    gallery = gr.Gallery(
        label="Overlays", columns=6, height=360, elem_id="vmad-gallery", buttons=["download", "fullscreen"]
    )
    table = gr.Dataframe(headers=list(BATCH_COLUMNS), interactive=False, wrap=True, elem_id="vmad-table")
    csv_file = gr.File(label="Table as CSV", interactive=False, elem_id="vmad-csv")

    progress_tracker = gr.Progress()  # Gradio finds the tracker as a parameter default

    def on_run(
        paths: list[str] | None, name: str, with_answers: bool, progress: Any = progress_tracker
    ) -> tuple[Any, ...]:
        return _batch(gr, service, paths, name, with_answers, progress)

    run.click(on_run, [files, class_name, answers], [gallery, table, csv_file, status])


def _batch(
    gr: ModuleType,
    service: WebService,
    paths: list[str] | None,
    class_name: str,
    answers: bool,
    progress: Any,
) -> tuple[Any, ...]:
    """Outputs of the batch tab (a message and empty outputs when the batch is refused)."""
    import pandas as pd

    empty_table = pd.DataFrame(columns=list(BATCH_COLUMNS))
    if not paths:
        return [], empty_table, None, "**Nothing to do:** upload images or a .zip first."

    def report(done: int, total: int, name: str) -> None:
        progress((done, total), desc=f"{name} ({done}/{total})", unit="images")

    try:
        result = service.run_batch(paths, class_name, answers, report)
    except VMADError as exc:
        gr.Warning(str(exc), title="Refused")
        return [], empty_table, None, f"**Refused.** {exc}"
    table = pd.DataFrame(
        [[row[c] for c in BATCH_COLUMNS] for row in result.rows], columns=list(BATCH_COLUMNS)
    )
    n = len(result.rows)
    status = f"**Done:** {n - result.n_failed} of {n} file(s) processed"
    status += f"; {result.n_failed} refused or unreadable (see the error column)." if result.n_failed else "."
    gallery = [(str(p), caption) for p, caption in result.gallery]
    return gallery, table, str(result.csv_path), status


def launch(
    service: WebService,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: Sequence[Path] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Build the page, start serving, call ``on_ready(url)``, then block until Ctrl-C or SIGTERM (both close
    the server cleanly)."""
    import signal

    demo = build_app(service, examples)
    demo.queue(default_concurrency_limit=1, max_size=64)
    allowed = [str(service.work_dir.resolve())] + sorted({str(Path(p).resolve().parent) for p in examples})
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        max_file_size=service.limits.max_upload_bytes,
        allowed_paths=allowed,
        enable_monitoring=False,
        mcp_server=False,
        ssr_mode=False,
        pwa=False,
        run_history=False,
        footer_links=["api"],
        quiet=True,
    )
    if on_ready is not None:
        on_ready(url)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.block_thread()
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
