"""Fixtures of the search tests: one thread per op, and the tiny noise-trained model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def load_tiny():
    """``tests/search/tiny.py`` by path (independent of pytest's import mode)."""
    spec = importlib.util.spec_from_file_location("arq_search_tests_tiny", Path(__file__).with_name("tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine the threads of small ops mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    return load_tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny.trained_tiny_net(0)
