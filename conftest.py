"""Session-wide test settings for both test trees (pytest.ini's testpaths).

Trained models registered by tests go to a temporary folder:

``samliverseg train`` registers every finished run in the user models folder
(``$SAMLIVERSEG_MODELS``, default ``<weights cache>/models``); without this, running the tests
would fill a developer's real models folder. A test that needs its own folder still uses
``monkeypatch.setenv``.
"""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _user_models_in_a_temporary_folder(tmp_path_factory):
    old = os.environ.get("SAMLIVERSEG_MODELS")
    os.environ["SAMLIVERSEG_MODELS"] = str(tmp_path_factory.mktemp("user_models"))
    yield
    if old is None:
        os.environ.pop("SAMLIVERSEG_MODELS", None)
    else:
        os.environ["SAMLIVERSEG_MODELS"] = old
