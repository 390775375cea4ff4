"""Test setup: the scripts import from the repo root, the hub is never contacted, tiny assets are built once per
session. `pytest -m "not slow"` leaves out the end-to-end, learning, two-process and notebook tests."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests build their own tiny models; a hub call would be a bug
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end, learning, two-process or notebook run (seconds to a minute)")


def tiny_assets(module) -> str:
    """The script's tiny assets, built by its own preset code into .cache/tiny_assets/ under a name that changes
    whenever the preset appendix's text does: a later test session reuses them, a changed builder rebuilds."""
    import hashlib

    text = open(module.__file__).read()
    digest = hashlib.sha256(text[text.index("# %% Appendix D") :].encode()).hexdigest()[:12]
    directory = os.path.join(REPO, ".cache", "tiny_assets", f"{module.__name__}-{digest}")
    module.build_tiny_assets(directory)  # skipped when already built
    return directory


@pytest.fixture(scope="session")
def ppo_assets():
    """Tiny GPT-2, DistilBERT classifier and review set, built by the script's own preset code."""
    import ppo_gpt2_imdb

    return tiny_assets(ppo_gpt2_imdb)


@pytest.fixture(scope="session")
def dpo_assets():
    """Tiny Llama, Llama-style tokenizer and preference set, built by the DPO script's own preset code."""
    import dpo_llama2_stackexchange

    return tiny_assets(dpo_llama2_stackexchange)


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No API key, no ~/.netrc, no WANDB_MODE."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.setenv(name, "")  # recorded, so that whatever the test sets is undone after it
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
