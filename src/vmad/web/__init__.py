"""The web page of ``vmad serve`` and what it shares with ``vmad chat``.

``limits`` (upload checks), ``service`` (analyse, follow up, batch) and ``outputs`` (mask / overlay files)
need no Gradio; ``app`` builds the Gradio page and is imported only by ``vmad serve`` (the ``web`` extra), so
``import vmad`` and ``import vmad.web`` work without Gradio installed.
"""

from vmad.web.limits import UploadLimits
from vmad.web.service import Analysis, BatchResult, WebService

__all__ = ["Analysis", "BatchResult", "UploadLimits", "WebService"]
