"""Shared pytest fixtures.

``local_hub``: a stand-in Hugging Face Hub server (see ``tests/hub_server.py``) on 127.0.0.1,
fresh for each test, storing pushed repositories under the test's ``tmp_path``. It gives

* ``local_hub.endpoint``  the base URL (``HfApi(endpoint=...)``, ``push_folder_to_hub(..., endpoint=...)``);
* ``local_hub.token``     the one token the server accepts (looks like a real ``hf_...`` token, so
  tests can grep outputs for it);
* ``local_hub.user``      the token's user name (the default namespace);
* ``local_hub.env``       variables to merge into a subprocess's environment (``HF_ENDPOINT``,
  ``HF_TOKEN``, ``HF_HUB_OFFLINE=0`` ...): huggingface_hub reads ``HF_ENDPOINT`` at import, so a
  recipe's ``--push_to_hub`` is tested by running it as a subprocess with
  ``env={**os.environ, **local_hub.env}``;
* ``local_hub.repo_dir(repo_id)``  the folder holding the pushed files (load it with ``from_pretrained``);
* ``local_hub.requests``  ``(method, path)`` of every request received.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_server import LocalHub  # noqa: E402


@pytest.fixture
def local_hub(tmp_path_factory):
    token = "hf_" + secrets.token_hex(16)
    with LocalHub(tmp_path_factory.mktemp("local_hub"), token) as hub:
        yield hub
