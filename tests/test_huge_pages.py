"""moekit.experts.to_huge_pages: large CPU tensors copied onto memory advised for transparent huge pages."""

from pathlib import Path

import pytest
import torch
from torch import nn

from moekit.experts import GLUExperts, dispatch, huge_pages, to_huge_pages
from moekit.types import RoutingDecision

MIB = 2**20


def _supported() -> bool:
    try:
        huge_pages.thp_support()
    except RuntimeError:
        return False
    return True


needs_thp = pytest.mark.skipif(not _supported(), reason="no transparent huge pages here (not Linux, or THP off)")


def _block_advised(t: torch.Tensor) -> bool:
    """Whether every whole huge page of t's memory lies in a mapping advised MADV_HUGEPAGE."""
    lo = t.untyped_storage().data_ptr()
    hi = lo + t.untyped_storage().nbytes() // huge_pages.HUGE_PAGE * huge_pages.HUGE_PAGE
    maps = huge_pages._overlapping(huge_pages._mappings(), lo, hi)
    return bool(maps) and all(m.advised for m in maps)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1024, 1024)  # 4 MiB
        self.head = nn.Linear(1024, 1024, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules
        self.small = nn.Linear(16, 16)
        stats = torch.randn(1024, 768)  # 3 MiB, one buffer object in two modules
        self.register_buffer("stats", stats)
        self.small.register_buffer("stats", stats)
        self.register_buffer("view", stats[100:200])  # a view into the same memory


@needs_thp
def test_moves_large_tensors_and_keeps_values_identity_ties_and_views() -> None:
    torch.manual_seed(0)
    m = Tied()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    param, small_ptr = m.embed.weight, m.small.weight.data_ptr()
    report = to_huge_pages(m)
    assert (report.tensors, report.storages) == (4, 2)  # the tied weight once; three holders of one buffer block
    assert report.moved_bytes == 4 * MIB + 3 * MIB and report.skipped_bytes == 0
    assert report.huge_bytes is not None and 0 <= report.huge_bytes <= report.moved_bytes
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.embed.weight is param and m.head.weight is param and isinstance(param, nn.Parameter)
    assert param.data_ptr() % huge_pages.HUGE_PAGE == 0 and _block_advised(param)
    assert m.stats.data_ptr() == m.small.stats.data_ptr() == m.view.data_ptr() - 100 * 768 * 4
    assert m.small.weight.data_ptr() == small_ptr  # below min_bytes: not moved
    m.stats[100] += 1  # still one block: a write through one holder shows in the others
    assert torch.equal(m.view[0], m.small.stats[100])


@needs_thp
def test_second_call_moves_nothing() -> None:
    m = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024))  # two blocks of 8 MiB
    first = to_huge_pages(m)
    ptrs = [p.data_ptr() for p in m.parameters()]
    second = to_huge_pages(m)
    assert first.moved_bytes == 16 * MIB
    assert (second.tensors, second.moved_bytes, second.skipped_bytes) == (0, 0, 16 * MIB)
    assert [p.data_ptr() for p in m.parameters()] == ptrs


@needs_thp
def test_the_old_memory_is_let_go_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """moekit keeps no reference to what it moved: when a block is allocated, every block moved before it has
    been freed (the peak extra memory is one block), and after the call none is left."""
    import weakref

    m = nn.Module()
    for i in range(3):
        m.register_buffer(f"b{i}", torch.randn(1024, 1024))
    old = [weakref.ref(b) for b in m.buffers()]
    alive_at_each_allocation = []
    allocate = huge_pages._advised_block

    def watched(nbytes: int) -> torch.Tensor:
        alive_at_each_allocation.append([r() is not None for r in old])
        return allocate(nbytes)

    monkeypatch.setattr(huge_pages, "_advised_block", watched)
    to_huge_pages(m, progress=True)
    assert alive_at_each_allocation == [[True, True, True], [False, True, True], [False, False, True]]
    assert all(r() is None for r in old)


@needs_thp
def test_training_and_saving_still_work(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    to_huge_pages(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[0].weight.detach().clone()
    m(torch.randn(4, 1024)).square().sum().backward()
    opt.step()
    assert not torch.equal(m[0].weight, w0) and _block_advised(m[0].weight)  # the step wrote into the moved memory
    save_file(m.state_dict(), tmp_path / "m.safetensors")  # one block per tensor: no "shared tensors" refusal
    back = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_bank_on_huge_pages_gives_the_same_output(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    E, D, F, T, K = 8, 512, 384, 5, 2
    bank = GLUExperts(E, D, F, dtype=dtype)
    x = torch.randn(T, D).to(dtype)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    run = RoutingDecision(ids, torch.rand(T, K).to(dtype), E)
    with torch.inference_mode():
        before = dispatch(bank, x, run)
    to_huge_pages(bank, min_bytes=1)
    assert all(_block_advised(p) or p.untyped_storage().nbytes() < huge_pages.HUGE_PAGE for p in bank.parameters())
    with torch.inference_mode():
        assert torch.equal(dispatch(bank, x, run), before)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="min_bytes must be a positive int, got 0"):
        to_huge_pages(nn.Linear(4, 4), min_bytes=0)
    with pytest.raises(ValueError, match="min_bytes must be a positive int, got True"):
        to_huge_pages(nn.Linear(4, 4), min_bytes=True)


@needs_thp
def test_module_without_large_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Linear has no CPU parameter or buffer of at least min_bytes=2097152 .* holds 64"):
        to_huge_pages(nn.Linear(4, 4))


def test_thp_mode_and_support_read_the_kernel_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_ENABLED", setting)
    assert huge_pages.thp_mode() is None
    setting.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode() == "madvise"
    setting.write_text("always madvise [never]\n")
    assert huge_pages.thp_mode() == "never"
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    if hasattr(huge_pages.mmap, "MADV_HUGEPAGE"):
        with pytest.raises(RuntimeError, match="transparent huge pages are off .*never"):
            to_huge_pages(nn.Linear(1024, 1024))
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    with pytest.raises(RuntimeError, match="this platform is 'darwin'"):
        huge_pages.thp_support()


def test_smaps_parser_reads_ranges_huge_bytes_and_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000400000-7f0000800000 rw-p 00000000 00:00 0 \nSize:               4096 kB\nAnonHugePages:      4096 kB\n"
        "VmFlags: rd wr mr mw me ac hg \n"
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \nSize:               4096 kB\nAnonHugePages:         0 kB\n"
        "VmFlags: rd wr mr mw me ac nh \n"
    )
    monkeypatch.setattr(huge_pages, "SMAPS", smaps)
    maps = huge_pages._mappings()
    assert [(m.start, m.end, m.huge_kb, m.advised) for m in maps] == [
        (0x7F0000000000, 0x7F0000400000, 0, False), (0x7F0000400000, 0x7F0000800000, 4096, True)]  # fmt: skip
    assert huge_pages._overlapping(maps, 0x7F00003FF000, 0x7F0000401000) == maps
    assert huge_pages._overlapping(maps, 0x7F0000400000, 0x7F0000500000) == maps[1:]
    monkeypatch.setattr(huge_pages, "SMAPS", tmp_path / "missing")
    assert huge_pages._mappings() == [] and huge_pages.huge_page_bytes(torch.zeros(4)) is None
