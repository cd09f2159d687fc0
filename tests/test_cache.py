"""precompute.cache: the Zarr v3 layout, its writer, and the fast reader.

The reader parses Zarr's shard index itself, so every test that reads also holds it
to what zarr-python returns for the same store."""

import errno
import fcntl
import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import precompute.cache as cache_module
from precompute.cache import (CacheError, CacheLockedError, GroupWriter, _RowReader, default_shard_size,
                              open_cache, packed_size)
from precompute.cli import main as cache_cli
from precompute.targets import (bilinear_matrix, pack_upper, patch_similarity, resize_attention,
                                resize_similarity, unpack_upper)

P = 49  # a 7x7 teacher grid keeps every test fast; nothing in the format depends on P
META = {"teacher": "unimed-b16", "aliases": ["unimed"], "arch": "ViT-B-16", "checkpoint_sha256": "ab" * 32,
        "preprocessing": {"image_size": 224, "mean": [0.5, 0.5, 0.5]}, "recipe": "r/v1", "num_patches": P,
        "random_init": False, "seed": None, "versions": {"torch": "x"}}


def targets(n: int, seed: int = 0, num_patches: int = P):
    g = torch.Generator().manual_seed(seed)
    sim = pack_upper(patch_similarity(torch.randn(n, num_patches, 16, generator=g))).half().numpy()
    attn = torch.softmax(torch.randn(n, num_patches, generator=g), -1).numpy()
    return sim, attn


def keys_(n: int, prefix: str = "img") -> list[str]:
    return [f"case_{i % 3}/{prefix}_{i:03d}.png" for i in range(n)]


def write_all(writer: GroupWriter, sim, attn, failures=None):
    """Write every row, shard by shard, as build.py does."""
    failures = failures or {}
    n = len(writer.keys)
    with writer.lock():
        for lo in range(0, n, writer.shard_size):
            rows = np.arange(lo, min(lo + writer.shard_size, n))
            writer.write_rows(rows, sim[rows], attn[rows], {r: failures[r] for r in rows if r in failures})


@pytest.fixture()
def built(tmp_path):
    keys = keys_(10)
    sim, attn = targets(10)
    writer = GroupWriter.open(tmp_path / "cache", "unimed-b16", keys, P, META, shard_size=4)
    write_all(writer, sim, attn)
    return tmp_path / "cache", keys, sim, attn


def test_round_trip_is_exact(built):
    cache, keys, sim, attn = built
    group = open_cache(cache)["unimed-b16"]
    assert group.keys() == keys and len(group) == 10 and keys[3] in group and "nope" not in group
    assert (group.num_patches, group.native_grid, group.shard_size) == (P, 7, 4)
    assert group.metadata["checkpoint_sha256"] == META["checkpoint_sha256"]
    assert group.metadata["schema_version"] == 1
    for i, key in enumerate(keys):
        s, a = group.native_packed(key)
        assert s.dtype == np.float16 and a.dtype == np.float32
        assert np.array_equal(s, sim[i]) and np.array_equal(a, attn[i])
        assert s.flags.writeable  # torch.from_numpy in DataLoader workers must not warn
    S, a = group.native(keys[5])
    assert torch.equal(S, unpack_upper(torch.from_numpy(sim[5]).float(), P))
    S_t, a_t = group.targets(keys[5], grid=12)
    R = bilinear_matrix(7, 12)
    assert S_t.shape == (144, 144) and a_t.shape == (144,)
    assert torch.equal(S_t, resize_similarity(S, R))
    assert torch.equal(a_t, resize_attention(torch.from_numpy(attn[5]), R))
    S_n, a_n = group.targets(keys[5], grid=7)   # native grid: S itself, attention / max
    assert torch.equal(S_n, S) and torch.allclose(a_n, a / a.max())


def test_plain_zarr_reads_the_store_and_agrees_with_our_reader(built):
    cache, keys, sim, attn = built
    root = zarr.open_group(str(cache), mode="r")
    assert root.attrs["medalign_cache_schema"] == 1
    g = root["unimed-b16"]
    assert g.attrs["teacher"] == "unimed-b16" and g.attrs["shard_size"] == 4
    assert g["keys"][:].tolist() == keys
    assert g["status"][:].tolist() == [1] * 10
    assert np.array_equal(g["similarity"][:], sim) and np.array_equal(g["attention"][:], attn)
    group = open_cache(cache)["unimed"]
    for i, key in enumerate(keys):
        s, a = group.native_packed(key)
        assert np.array_equal(s, g["similarity"][i]) and np.array_equal(a, g["attention"][i])
    # what cache_schema.md tells a plain-zarr reader to do
    P_ = g.attrs["num_patches"]
    S = np.ones((P_, P_), np.float32)
    iu = np.triu_indices(P_, 1)
    S[iu] = g["similarity"][2].astype(np.float32)
    S.T[iu] = g["similarity"][2].astype(np.float32)
    assert np.array_equal(S, group.native(keys[2])[0].numpy())


def test_alias_lookup_and_unknown_names(built, tmp_path):
    cache = built[0]
    c = open_cache(cache)
    assert list(c) == ["unimed-b16"] and len(c) == 1
    assert c["unimed"] is c["unimed-b16"] and "unimed" in c and "biomedclip" not in c
    with pytest.raises(KeyError, match="available: unimed-b16 \\(aliases: unimed\\)"):
        c["biomedclip"]
    # a second group with the same alias makes the alias ambiguous, never a silent pick
    GroupWriter.open(cache, "unimed-b16-seed1", ["x.png"], P, {**META, "checkpoint_sha256": "cd" * 32})
    with pytest.raises(KeyError, match="several groups"):
        open_cache(cache)["unimed"]


def test_unknown_key_names_key_group_and_build_command(built):
    group = open_cache(built[0])["unimed-b16"]
    with pytest.raises(KeyError, match=r"'new/one.png' is not in cache group 'unimed-b16'.*medalign-cache build"):
        group.index("new/one.png")
    assert group.missing(["new/one.png", built[1][0]]) == ["new/one.png"]


def test_append_keeps_old_rows_and_results(built):
    cache, keys, sim, attn = built
    more = keys_(5, prefix="new")
    # a later dataset: some old keys (in another order) plus new ones
    writer = GroupWriter.open(cache, "unimed-b16", more[:2] + keys[::-1] + more[2:], P, META)
    assert writer.keys == keys + more
    assert writer.num_shards == 4 and writer.shard_size == 4
    assert writer.pending_rows().tolist() == [10, 11, 12, 13, 14]
    group = open_cache(cache)["unimed-b16"]
    assert [group.index(k) for k in keys] == list(range(10))
    assert all(np.array_equal(group.native_packed(k)[0], sim[i]) for i, k in enumerate(keys))
    assert group.missing(keys + more) == more
    with pytest.raises(CacheError, match="pending"):
        group.native_packed(more[0])
    sim2, attn2 = targets(5, seed=1)
    with writer.lock():
        writer.write_rows(np.array([10, 11]), sim2[:2], attn2[:2], {})
        writer.write_rows(np.array([12, 13, 14]), sim2[2:], attn2[2:], {})
    group = open_cache(cache)["unimed-b16"]
    assert np.array_equal(group.native_packed(more[4])[0], sim2[4])
    assert np.array_equal(group.native_packed(keys[9])[0], sim[9])
    assert np.array_equal(zarr.open_array(str(cache / "unimed-b16" / "similarity"))[10:], sim2)


def test_pending_rows_only_for_the_requested_keys(built):
    cache, keys, _, _ = built
    writer = GroupWriter.open(cache, "unimed-b16", ["only/this.png"] + keys[:2], P, META)
    extra = GroupWriter.open(cache, "unimed-b16", ["other/that.png"], P, META)
    # the second dataset's pending image is not the first build's business
    assert writer.pending_rows().tolist() == [10]
    assert extra.pending_rows().tolist() == [11]


@pytest.mark.parametrize("field,value", [("checkpoint_sha256", "ff" * 32), ("arch", "ViT-L-14-336"),
                                         ("preprocessing", {"image_size": 336}), ("random_init", True),
                                         ("recipe", "r/v2")])
def test_metadata_mismatch_is_refused(built, field, value):
    with pytest.raises(CacheError, match=rf"'{field}'.*another group name \(--group unimed-b16-2\)"):
        GroupWriter.open(built[0], "unimed-b16", ["a.png"], P, {**META, field: value})
    # fields that do not change the numbers (software versions) may differ
    GroupWriter.open(built[0], "unimed-b16", ["a.png"], P, {**META, "versions": {"torch": "y"}})


def test_num_patches_and_shard_size_mismatch(built):
    with pytest.raises(CacheError, match="num_patches"):
        GroupWriter.open(built[0], "unimed-b16", ["a.png"], 64, {**META, "num_patches": 64})
    with pytest.raises(CacheError, match="--shard-size 4"):
        GroupWriter.open(built[0], "unimed-b16", ["a.png"], P, META, shard_size=8)


def test_bad_keys_and_group_names(tmp_path):
    with pytest.raises(CacheError, match="repeat"):
        GroupWriter.open(tmp_path / "c", "g", ["a.png", "b.png", "a.png"], P, META)
    with pytest.raises(CacheError, match="folder name"):
        GroupWriter.open(tmp_path / "c", "../evil", ["a.png"], P, META)
    with pytest.raises(CacheError, match="square"):
        GroupWriter.open(tmp_path / "c", "g", ["a.png"], 50, {**META, "num_patches": 50})


def test_lock_refuses_a_second_writer(tmp_path):
    writer = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META)
    other = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META)
    with writer.lock():
        with pytest.raises(CacheLockedError, match=r"another build is writing group 'g' of cache .*\(pid \d+"):
            with other.lock():
                pass
        with pytest.raises(CacheLockedError):   # opening (create/append) takes the lock too
            GroupWriter.open(tmp_path / "c", "g", keys_(5), P, META)
    with other.lock():                          # released: the next build may go
        pass
    with pytest.raises(CacheError, match="inside `with writer.lock"):
        writer.write_rows(np.array([0]), *targets(1), {})


def test_lock_held_by_another_process(tmp_path):
    writer = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from precompute.cache import GroupWriter\n"
         f"w = GroupWriter.open({str(tmp_path / 'c')!r}, 'g', [], {P}, {META!r})\n"
         "with w.lock():\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=f"pid {holder.pid}"):
            with writer.lock():
                pass
    finally:
        holder.communicate("")
    with writer.lock():
        pass


def test_resume_after_partial_writes(tmp_path):
    keys = keys_(12)
    sim, attn = targets(12)
    writer = GroupWriter.open(tmp_path / "c", "g", keys, P, META, shard_size=4)
    with writer.lock():
        writer.write_rows(np.arange(0, 4), sim[:4], attn[:4], {})
        writer.write_rows(np.array([5, 7]), sim[[5, 7]], attn[[5, 7]], {})  # scattered rows in one shard
    # a new process (the rerun) sees exactly what is left
    again = GroupWriter.open(tmp_path / "c", "g", keys, P, META)
    assert again.pending_rows().tolist() == [4, 6, 8, 9, 10, 11]
    with again.lock():
        again.write_rows(np.array([4, 6]), sim[[4, 6]], attn[[4, 6]], {})
        again.write_rows(np.arange(8, 12), sim[8:], attn[8:], {})
    assert again.pending_rows().tolist() == []
    group = open_cache(tmp_path / "c")["g"]
    z = zarr.open_array(str(tmp_path / "c" / "g" / "similarity"))
    assert np.array_equal(z[:], sim)
    assert all(np.array_equal(group.native_packed(k)[0], sim[i]) for i, k in enumerate(keys))


def test_failed_rows(tmp_path):
    keys = keys_(6)
    sim, attn = targets(6)
    writer = GroupWriter.open(tmp_path / "c", "g", keys, P, META, shard_size=4)
    sim[2], attn[2] = np.nan, np.nan   # what build.py hands over for an image that failed
    write_all(writer, sim, attn, failures={2: "cannot identify image file", 5: "truncated PNG"})
    group = open_cache(tmp_path / "c")["g"]
    assert [group.status(k) for k in keys] == ["done", "done", "failed", "done", "done", "failed"]
    with pytest.raises(CacheError, match=rf"'{keys[5]}'.*is failed.*failures.jsonl"):
        group.targets(keys[5], grid=7)
    assert group.missing(keys) == [keys[2], keys[5]]
    lines = [json.loads(x) for x in (tmp_path / "c" / "g" / "failures.jsonl").read_text().splitlines()]
    assert lines == [{"key": keys[2], "error": "cannot identify image file"},
                     {"key": keys[5], "error": "truncated PNG"}]
    # stored as NaN (the zarr fill value: the chunk is not even written), never as numbers
    assert np.isnan(zarr.open_array(str(tmp_path / "c" / "g" / "similarity"))[5]).all()
    assert writer.pending_rows().tolist() == []
    assert writer.pending_rows(retry_failed=True).tolist() == [2, 5]


@pytest.mark.parametrize("where", ["similarity", "attention", "zero attention"])
def test_non_finite_targets_are_refused(tmp_path, where):
    keys = keys_(4)
    sim, attn = targets(4)
    if where == "similarity":
        sim[1, 7] = np.nan
    elif where == "attention":
        attn[1, 3] = np.inf
    else:
        attn[1] = 0
    writer = GroupWriter.open(tmp_path / "c", "g", keys, P, META)
    with writer.lock(), pytest.raises(CacheError, match=f"'{keys[1]}'.*NaN/inf"):
        writer.write_rows(np.arange(4), sim, attn, {})
    assert writer.pending_rows().tolist() == [0, 1, 2, 3]   # nothing committed


def test_write_rows_validates_its_input(tmp_path):
    writer = GroupWriter.open(tmp_path / "c", "g", keys_(8), P, META, shard_size=4)
    sim, attn = targets(8)
    with writer.lock():
        with pytest.raises(CacheError, match="several shards"):
            writer.write_rows(np.arange(2, 6), sim[2:6], attn[2:6], {})
        with pytest.raises(CacheError, match="sorted"):
            writer.write_rows(np.array([1, 0]), sim[:2], attn[:2], {})
        with pytest.raises(CacheError, match="float16"):
            writer.write_rows(np.arange(2), sim[:2].astype(np.float32), attn[:2], {})
        with pytest.raises(CacheError, match="not being written"):
            writer.write_rows(np.arange(2), sim[:2], attn[:2], {3: "x"})


def test_reading_pending_rows_is_an_error(tmp_path):
    keys = keys_(4)
    GroupWriter.open(tmp_path / "c", "g", keys, P, META)
    group = open_cache(tmp_path / "c")["g"]
    with pytest.raises(CacheError, match=rf"'{keys[0]}'.*is pending.*medalign-cache build"):
        group.native_packed(keys[0])


def _child_reads(group, keys, queue):
    queue.put([group.native_packed(k)[0].tolist() for k in keys])


def test_reads_after_fork_and_after_pickling(built):
    cache, keys, sim, _ = built
    group = open_cache(cache)["unimed-b16"]
    group.native_packed(keys[0])            # the parent has open fds and a cached index
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    # Fork while another parent thread is mid-read (holds the reader's mutex): the
    # child must start afresh, not wait forever for a lock nobody will release.
    with group._similarity._mutex:
        child = ctx.Process(target=_child_reads, args=(group, keys, queue))
        child.start()
    try:
        got = queue.get(timeout=20)
    finally:
        child.join(5)
        child.kill()
    assert child.exitcode == 0
    assert np.array_equal(np.array(got, dtype=np.float16), sim)
    assert np.array_equal(group.native_packed(keys[9])[0], sim[9])   # the parent's fds still work
    clone = pickle.loads(pickle.dumps(group))                        # spawn-started workers
    assert np.array_equal(clone.native_packed(keys[4])[0], sim[4])


def test_reader_notices_a_rewritten_shard(tmp_path, monkeypatch):
    """An fd closed for the open-files cap and reopened later may see a newer shard file
    (a build added rows): the cached index must not be reused for it."""
    monkeypatch.setattr(_RowReader, "MAX_OPEN", 1)
    keys = keys_(8)
    sim, attn = targets(8)
    writer = GroupWriter.open(tmp_path / "c", "g", keys, P, META, shard_size=4)
    with writer.lock():
        writer.write_rows(np.array([0, 1, 3]), sim[[0, 1, 3]], attn[[0, 1, 3]], {})
        writer.write_rows(np.arange(4, 8), sim[4:], attn[4:], {})
    group = open_cache(tmp_path / "c")["g"]
    assert np.array_equal(group.native_packed(keys[3])[0], sim[3])    # caches shard 0's index
    group.native_packed(keys[5])                                       # evicts shard 0's fd
    with writer.lock():
        writer.write_rows(np.array([2]), sim[[2]], attn[[2]], {})     # shard 0 rewritten, row 3 moves
    assert np.array_equal(group.native_packed(keys[3])[0], sim[3])


def test_leftover_partial_files_are_cleaned(built):
    cache = built[0]
    junk = [cache / "unimed-b16" / "similarity" / "c" / "0" / "0.3f2a.partial",
            cache / "unimed-b16" / "status" / "c" / "1.aa.partial"]
    for p in junk:
        p.write_bytes(b"half a shard")
    writer = GroupWriter.open(cache, "unimed-b16", [], P, META)
    with pytest.raises(CacheError, match="lock"):
        writer.clean_partials()
    with writer.lock():
        assert writer.clean_partials() == 2
    assert not any(p.exists() for p in junk)
    assert np.array_equal(open_cache(cache)["unimed-b16"].native_packed(built[1][0])[0], built[2][0])


def test_corrupt_shard_is_reported(built):
    cache, keys, _, _ = built
    shard = cache / "unimed-b16" / "similarity" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF                         # flip bits in the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(cache)["unimed-b16"].native_packed(keys[4])


def test_foreign_codecs_fall_back_to_zarr_with_a_warning(built):
    """A store rewritten by other tools (here: no sharding, no blosc) still reads correctly."""
    cache, keys, _, attn = built
    path = cache / "unimed-b16" / "attention"
    data = zarr.open_array(str(path))[:]
    zarr.create_array(store=str(path), shape=data.shape, chunks=(3, P), dtype="float32", overwrite=True)[:] = data
    with pytest.warns(UserWarning, match="zarr-python"):
        group = open_cache(cache)["unimed-b16"]
    assert np.array_equal(group.native_packed(keys[7])[1], attn[7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # once per array, not per read or per open
        open_cache(cache)["unimed-b16"].native_packed(keys[1])


def test_open_cache_errors(tmp_path, built):
    with pytest.raises(CacheError, match="no cache at"):
        open_cache(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheError, match="not a medalign cache"):
        open_cache(tmp_path / "plain")
    zarr.create_group(store=str(tmp_path / "other"))
    with pytest.raises(CacheError, match="not a medalign cache"):
        open_cache(tmp_path / "other")
    with pytest.raises(CacheError, match="not a medalign cache"):     # and no writing into it either
        GroupWriter.open(tmp_path / "other", "g", ["a"], P, META)
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="choose a new or empty folder"):
        GroupWriter.open(tmp_path / "plain", "g", ["a"], P, META)
    root = built[0] / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["medalign_cache_schema"] = 99
    root.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="schema 99.*upgrade"):
        open_cache(built[0])


def test_default_shard_size_targets_tens_of_megabytes():
    for num_patches in (25, 196, 576, 1024):
        s = default_shard_size(num_patches)
        raw = s * (packed_size(num_patches) * 2 + num_patches * 4)
        assert 16 <= s <= 512 and (raw <= 32 * 2**20 or s == 16)
    assert default_shard_size(196) == 512 and default_shard_size(576) == 100


def test_the_plain_reader_in_cache_schema_md(built):
    """cache_schema.md's numpy + zarr recipe gives medalign's targets."""
    cache, keys, _, _ = built
    doc = (Path(__file__).resolve().parents[1] / "cache_schema.md").read_text()
    code = doc.split("<!-- plain-reader -->\n```python\n", 1)[1].split("```", 1)[0]
    group = open_cache(cache)["unimed-b16"]
    for G in (7, 12, 3):
        scope = {"cache_path": str(cache), "group": "unimed-b16", "key": keys[6], "G": G}
        exec(code, scope)
        S_t, a_t = group.targets(keys[6], grid=G)
        assert np.abs(scope["S_t"] - S_t.double().numpy()).max() < 1e-5
        assert np.abs(scope["a_t"] - a_t.double().numpy()).max() < 1e-6


# ----------------------------------------------------------------------------- crash safety, durability


class Crash(BaseException):
    """The process dying at this point (nothing after it runs)."""


@pytest.mark.parametrize("chunks_written", [0, 1])
def test_an_append_killed_before_its_keys_are_written_leaves_no_phantom_rows(tmp_path, monkeypatch, chunks_written):
    """keys are resized, then named one chunk at a time: a crash in between used to leave
    empty keys with pending rows that no rerun could finish or remove."""
    monkeypatch.setattr(cache_module, "KEYS_CHUNK", 4)   # so 6 new keys span two chunks
    keys, more = keys_(10), keys_(6, prefix="new")
    sim, attn = targets(16)
    write_all(GroupWriter.open(tmp_path / "c", "g", keys, P, META, shard_size=4), sim[:10], attn[:10])

    real_setitem, writes = zarr.Array.__setitem__, []

    def dying_setitem(arr, selection, value):
        if str(arr.store_path).endswith("/g/keys"):
            if len(writes) == chunks_written:
                raise Crash
            writes.append(selection)
        real_setitem(arr, selection, value)

    with monkeypatch.context() as m:
        m.setattr(zarr.Array, "__setitem__", dying_setitem)
        with pytest.raises(Crash):
            GroupWriter.open(tmp_path / "c", "g", keys + more, P, META)
    stored = zarr.open_array(str(tmp_path / "c" / "g" / "keys"))[:].tolist()
    assert stored[10 + 2 * chunks_written:] == [""] * (6 - 2 * chunks_written)     # named, then empty
    group = open_cache(tmp_path / "c")["g"]            # the crash's state, as readers see it
    assert group.keys() == keys + more[:2 * chunks_written]
    assert "" not in group and group.missing(group.keys()) == more[:2 * chunks_written]

    writer = GroupWriter.open(tmp_path / "c", "g", keys + more, P, META)   # the rerun
    assert writer.keys == keys + more and writer.pending_rows().tolist() == list(range(10, 16))
    write_all(writer, sim, attn)
    group = open_cache(tmp_path / "c")["g"]
    assert group.keys() == keys + more and group.missing(keys + more) == []
    z = zarr.open_group(str(tmp_path / "c" / "g"))
    assert z["keys"][:].tolist() == keys + more and (z["status"][:] == 1).all()
    assert np.array_equal(z["similarity"][:], sim) and np.array_equal(z["attention"][:], attn)


def test_keys_chunk_does_not_depend_on_the_first_build(tmp_path):
    GroupWriter.open(tmp_path / "c", "g", keys_(2), P, META)
    GroupWriter.open(tmp_path / "c", "g", keys_(2) + keys_(300, prefix="more"), P, META)
    meta = json.loads((tmp_path / "c" / "g" / "keys" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [65536]
    assert [p.name for p in (tmp_path / "c" / "g" / "keys" / "c").iterdir()] == ["0"]   # 302 keys, one file


def test_a_shard_is_on_disk_before_its_status_says_done(tmp_path, monkeypatch):
    synced, at_commit = [], []
    real_fsync, real_commit = os.fsync, GroupWriter._commit

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_commit(self, rows, status):
        at_commit.append((int(rows[0]) // self.shard_size, set(synced)))
        real_commit(self, rows, status)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(GroupWriter, "_commit", recording_commit)
    write_all(GroupWriter.open(tmp_path / "c", "g", keys_(8), P, META, shard_size=4), *targets(8),
              failures={5: "broken"})
    g = (tmp_path / "c" / "g").resolve()
    for shard, done_before in at_commit:
        for name in ("similarity", "attention"):
            assert {g / name / "c" / str(shard) / "0", g / name / "c" / str(shard), g / name / "c"} <= done_before
    assert g / "failures.jsonl" in at_commit[1][1] and (g / "keys" / "c" / "0") in at_commit[0][1]


def test_a_part_cleans_the_temp_files_of_its_own_shards(built):
    cache, keys, sim, _ = built
    g = cache / "unimed-b16"
    junk = {0: [g / "similarity" / "c" / "0" / "0.3f2a.partial", g / "status" / "c" / "0.aa.partial"],
            1: [g / "attention" / "c" / "1" / "0.b7.partial", g / "status" / "c" / "1.cc.partial"],
            None: [g / "keys" / "c" / "0.dd.partial", g / "status" / "zarr.ee.partial"]}
    for p in sum(junk.values(), []):
        p.write_bytes(b"half a file")
    writer = GroupWriter.open(cache, "unimed-b16", [], P, META)      # opening: keys' and metadata's
    assert not any(p.exists() for p in junk[None]) and all(p.exists() for p in junk[0] + junk[1])
    with writer.lock(part=(1, 2)):
        assert writer.clean_partials() == 2
    assert not any(p.exists() for p in junk[1]) and all(p.exists() for p in junk[0])
    with writer.lock(part=(0, 2)):
        assert writer.clean_partials() == 2
    assert not list(g.rglob("*.partial"))
    assert np.array_equal(open_cache(cache)["unimed-b16"].native_packed(keys[0])[0], sim[0])


# ----------------------------------------------------------------------------- errors a user can act on


def test_file_systems_without_locks_and_unwritable_locks_are_cache_errors(tmp_path, monkeypatch):
    writer = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META)
    with monkeypatch.context() as m:
        for code in (errno.ENOLCK, errno.ENOSYS):
            m.setattr(fcntl, "flock", lambda f, op, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
            with pytest.raises(CacheError, match=r"build\.lock does not support file locks.*-o flock"):
                with writer.lock():
                    pass

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as m:
        m.setattr(cache_module, "open", denied, raising=False)
        with pytest.raises(CacheError, match=r"cannot open the lock file .*build\.lock: Permission denied; make it "
                                             r"writable"):
            with writer.lock():
                pass


def test_a_full_disk_is_a_cache_error_and_nothing_is_committed(tmp_path, monkeypatch):
    writer = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META)

    async def full(store, key, value, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(store.root / key))

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with writer.lock(), pytest.raises(CacheError, match=r"cannot write cache group .*similarity/c/0/0: No space left "
                                                         r"on device; free space.*rerunning"):
        writer.write_rows(np.arange(4), *targets(4), {})
    monkeypatch.undo()
    assert writer.pending_rows().tolist() == [0, 1, 2, 3]


def test_a_damaged_group_is_a_cache_error_naming_it(built):
    cache = built[0]
    import shutil
    shutil.rmtree(cache / "unimed-b16" / "status")
    with pytest.raises(CacheError, match=r"cache group .*unimed-b16 is damaged.*rebuild it"):
        open_cache(cache)["unimed-b16"]
    r = CliRunner().invoke(cache_cli, ["info", "--cache", str(cache)], catch_exceptions=False)
    assert r.exit_code == 1 and "is damaged" in r.output and "Traceback" not in r.output


def test_grid_must_be_a_positive_integer(built):
    cache, keys, _, _ = built
    group = open_cache(cache)["unimed-b16"]
    for grid in (0, -3, 2.5, "24", True, None):
        with pytest.raises(ValueError, match=r"grid must be a positive integer .* got"):
            group.targets(keys[0], grid=grid)
    assert group.targets(keys[0], grid=np.int64(5))[0].shape == (25, 25)


# ----------------------------------------------------------------------------- caches at URLs


def test_a_memory_url_cache_holds_the_same_bytes_as_a_local_one(tmp_path, memory_url):
    import fsspec
    keys, more = keys_(10), keys_(3, prefix="new")
    sim, attn = targets(13)
    for where in (tmp_path / "c", memory_url):
        writer = GroupWriter.open(where, "unimed-b16", keys, P, META, shard_size=4, image_root="/data/images")
        write_all(writer, sim[:10], attn[:10], failures={3: "broken"})
        writer = GroupWriter.open(where, "unimed-b16", keys + more, P, META)            # an append
        with writer.lock():
            writer.write_rows(np.array([10, 11]), sim[10:12], attn[10:12], {})
            writer.write_rows(np.array([12]), sim[12:], attn[12:], {})
    fs = fsspec.filesystem("memory")
    local = {p.relative_to(tmp_path / "c").as_posix(): p.read_bytes() for p in (tmp_path / "c").rglob("*")
             if p.is_file() and p.suffix != ".lock"}
    root = memory_url.removeprefix("memory://")
    remote = {p.removeprefix(f"/{root}/"): fs.cat_file(p) for p in fs.find(f"/{root}")}
    assert remote == local and "unimed-b16/similarity/c/2/0" in local   # the store, byte for byte

    group = open_cache(memory_url)["unimed"]
    assert str(group.path) == f"memory:///{root}/unimed-b16" and group.keys() == keys + more
    assert group.metadata["image_root"] == "/data/images"
    assert {"torch", "zarr", "numcodecs", "numpy", "medalign"} <= set(group.metadata["versions"])
    assert group.stored_bytes() == sum(len(b) for name, b in local.items() if name.startswith("unimed-b16/"))
    assert group.status(keys[3]) == "failed"
    assert json.loads((group.path / "failures.jsonl").read_text())["key"] == keys[3]
    for i, key in enumerate(keys + more):
        if i != 3:
            s, a = group.native_packed(key)
            assert np.array_equal(s, sim[i]) and np.array_equal(a, attn[i])
    assert group._similarity.fast          # range reads of the shard index, not zarr-python
    clone = pickle.loads(pickle.dumps(group))
    assert np.array_equal(clone.native_packed(keys[4])[0], sim[4])


def test_url_parts_wait_for_part_zero_to_create_the_group(memory_url, monkeypatch):
    """No locks at a URL: part 0 creates and extends the group, the others wait for it."""
    monkeypatch.setattr(cache_module, "URL_PART_WAIT_S", 0.3)
    keys = keys_(8)
    with pytest.raises(CacheError, match=r"part 1/2 waited 0 s for part 0 to create or extend group .*start part 0"):
        GroupWriter.open(memory_url, "g", keys, P, META, shard_size=4, part=(1, 2))
    with pytest.raises(CacheError, match="no cache at"):   # a waiting part writes nothing, not even the root
        open_cache(memory_url)
    GroupWriter.open(memory_url, "g", keys, P, META, shard_size=4, part=(0, 2))
    assert GroupWriter.open(memory_url, "g", keys, P, META, part=(1, 2)).keys == keys
    with pytest.raises(CacheError, match="waited"):                      # new keys: part 0 appends them
        GroupWriter.open(memory_url, "g", keys + ["new.png"], P, META, part=(1, 2))


def test_urls_that_cannot_work_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, why in (("s3://bucket/x", "s3fs"), ("nosuch://x/y", "Protocol not known")):
        for call in (lambda: GroupWriter.open(url, "g", keys_(2), P, META), lambda: open_cache(url)):
            with pytest.raises(CacheError, match=rf"cannot use cache URL '{url}': .*{why}"):
                call()
    with pytest.raises(CacheError, match=r"went through pathlib\.Path.*'s3://bucket/x'"):
        GroupWriter.open(Path("s3://bucket/x"), "g", keys_(2), P, META)
    assert list(tmp_path.iterdir()) == []     # never a local folder named like the URL


def test_image_root_is_that_of_the_last_build_that_wrote(tmp_path):
    GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META, image_root="/data/a")
    assert open_cache(tmp_path / "c")["g"].metadata["image_root"] == "/data/a"
    running = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META, image_root="/data/b")
    refused = GroupWriter.open(tmp_path / "c", "g", keys_(4), P, META, image_root="/data/c")
    with running.lock():
        with pytest.raises(CacheLockedError), refused.lock():
            pass
    assert open_cache(tmp_path / "c")["g"].metadata["image_root"] == "/data/b"   # not the refused build's


# ----------------------------------------------------------------------------- checksums and damage


def chunk_span(cache: Path, array: str, row: int, shard_size: int = 4, group: str = "unimed-b16"):
    """(shard file, offset, nbytes) of a row's chunk, from the shard index (cache_schema.md, "Shards")."""
    shard = cache / group / array / "c" / str(row // shard_size) / "0"
    data = shard.read_bytes()
    index = np.frombuffer(data[-(16 * shard_size + 4):-4], dtype="<u8").reshape(shard_size, 2)
    offset, nbytes = (int(x) for x in index[row % shard_size])
    return shard, offset, nbytes


def flip(path: Path, at: int, mask: int = 0xFF):
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def test_the_crc32c_residue_checks_a_chunk_with_its_checksum():
    import google_crc32c
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000, 40000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        framed = data + google_crc32c.value(data).to_bytes(4, "little")   # what the crc32c codec appends
        assert google_crc32c.value(framed) == cache_module.CRC32C_RESIDUE
        if n:
            assert google_crc32c.value(framed[:-1] + bytes([framed[-1] ^ 1])) != cache_module.CRC32C_RESIDUE


@pytest.mark.parametrize("array,where,mask", [
    ("similarity", "middle", 0xFF),    # one byte flipped in the middle of a similarity chunk
    ("attention", "middle", 0x10),     # one bit of an attention chunk
    ("attention", "last", 0x01),       # one bit of the stored checksum itself
])
def test_a_flipped_byte_or_bit_in_a_target_chunk_is_a_cache_error(built, array, where, mask):
    cache, keys, sim, attn = built
    shard, offset, nbytes = chunk_span(cache, array, 6)
    flip(shard, offset + (nbytes // 2 if where == "middle" else nbytes - 1), mask)
    group = open_cache(cache)["unimed-b16"]
    with pytest.raises(CacheError) as e:
        group.native_packed(keys[6])
    msg = str(e.value)
    assert "\n" not in msg and f"cache {cache}, group 'unimed-b16'" in msg and repr(keys[6]) in msg
    assert str(shard) in msg and "fails its checksum" in msg and "rebuild the group" in msg
    for i in (5, 7):                                   # the shard's other rows are intact and read as stored
        s, a = group.native_packed(keys[i])
        assert np.array_equal(s, sim[i]) and np.array_equal(a, attn[i])
    with pytest.raises(ValueError, match="checksum"):  # stock zarr-python checks the same codec
        zarr.open_array(str(cache / "unimed-b16" / array), mode="r")[6]
    assert group.unchecked_arrays == []


def test_caches_written_before_checksums_still_read(tmp_path, monkeypatch):
    """The old layout (no crc32c codec) reads exactly, through the fast reader, and says
    it is unchecked; damage that breaks decoding is a CacheError, not blosc's RuntimeError."""
    monkeypatch.setattr(cache_module, "CHUNK_CHECKSUMS", False)
    keys = keys_(10)
    sim, attn = targets(10)
    sim = np.round(sim.astype(np.float32), 1).astype(np.float16)   # compressible, like real cosines
    write_all(GroupWriter.open(tmp_path / "old", "unimed-b16", keys, P, META, shard_size=4), sim, attn)
    monkeypatch.undo()
    meta = json.loads((tmp_path / "old" / "unimed-b16" / "similarity" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]] == ["bytes", "blosc"]
    group = open_cache(tmp_path / "old")["unimed-b16"]
    assert group._similarity.fast and group.unchecked_arrays == ["similarity", "attention"]
    for i, key in enumerate(keys):
        s, a = group.native_packed(key)
        assert np.array_equal(s, sim[i]) and np.array_equal(a, attn[i])
    r = CliRunner().invoke(cache_cli, ["verify", "--cache", str(tmp_path / "old")], catch_exceptions=False)
    assert r.exit_code == 0 and r.output.endswith("ok\n"), r.output
    assert "note: similarity, attention of group unimed-b16 have no chunk checksums" in r.output
    shard, offset, nbytes = chunk_span(tmp_path / "old", "similarity", 2)
    data = bytearray(shard.read_bytes())
    data[offset + 16:offset + nbytes] = b"\xff" * (nbytes - 16)     # the frame's body garbled, header kept
    assert data[offset + 2] & 0x02 == 0                             # a compressed frame (not stored raw)
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"'{keys[2]}' \(row 2\) in {shard} is corrupt \(error during blosc"):
        open_cache(tmp_path / "old")["unimed-b16"].native_packed(keys[2])


@pytest.mark.parametrize("checksums", [True, False])
def test_an_emptied_keys_chunk_is_a_cache_error_naming_it(tmp_path, monkeypatch, checksums):
    monkeypatch.setattr(cache_module, "CHUNK_CHECKSUMS", checksums, raising=False)
    GroupWriter.open(tmp_path / "c", "unimed-b16", keys_(5), P, META, shard_size=4)
    monkeypatch.undo()
    chunk = tmp_path / "c" / "unimed-b16" / "keys" / "c" / "0"
    chunk.write_bytes(b"")                                          # a disk that lost the file's contents
    with pytest.raises(CacheError, match=rf"cache group .*unimed-b16 is damaged: {chunk} cannot be decoded.*"
                                         rf"rerun the `medalign-cache build`"):
        open_cache(tmp_path / "c")["unimed-b16"]
    r = CliRunner().invoke(cache_cli, ["info", "--cache", str(tmp_path / "c")], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.splitlines()) == 1
    assert str(chunk) in r.output and "Traceback" not in r.output


def test_a_deleted_keys_chunk_is_an_error_not_an_empty_group(built):
    cache = built[0]
    (cache / "unimed-b16" / "keys" / "c" / "0").unlink()    # zarr reads a missing chunk as its fill: ""
    with pytest.raises(CacheError, match=r"damaged: 10 rows from row 0 on hold results but have no key"):
        open_cache(cache)["unimed-b16"]
    for args in ([], ["--teacher", "unimed"]):
        r = CliRunner().invoke(cache_cli, ["verify", "--cache", str(cache), *args], catch_exceptions=False)
        assert r.exit_code == 1 and "have no key" in r.output and "0/0" not in r.output and "ok" not in r.output


def test_a_missing_shard_file_or_chunk_is_a_cache_error_naming_it(built):
    cache, keys, _, _ = built
    shard = cache / "unimed-b16" / "attention" / "c" / "1" / "0"
    shard.unlink()
    with pytest.raises(CacheError, match=rf"group 'unimed-b16': the stored attention of '{keys[5]}' \(row 5\) in "
                                         rf"{shard} is missing"):
        open_cache(cache)["unimed-b16"].native_packed(keys[5])
