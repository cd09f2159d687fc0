"""Shared test setup: nothing may touch the network, everything runs on CPU."""
import os
import uuid

import pytest

# Set before transformers / huggingface_hub / open_clip are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One thread: the suite also runs subprocesses and DataLoader workers on 2 cores, and an
# oversubscribed core makes tiny forwards ~100x slower.
torch.set_num_threads(1)


@pytest.fixture()
def memory_url():
    """A fresh memory:// location (fsspec's in-process file system), removed afterwards."""
    import fsspec
    name = f"medalign-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}/cache"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)
