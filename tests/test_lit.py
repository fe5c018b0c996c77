"""Perplexity evaluation: CausalLMModule and evaluate_perplexity against Hugging Face's own loss.

Run as a script (``fabric run ... tests/test_lit.py MODEL_DIR WINDOWS OUT_DIR``), this file is also the
worker of the 2-process data-parallel test.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedspallm.errors import UserError
from fedspallm.lit import CausalLMModule, evaluate_perplexity

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def random_windows(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=generator)


@torch.inference_mode()
def hf_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean over windows of HF's loss); each loss is the mean NLL over the window's T - 1 shifted tokens."""
    losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    return math.exp(torch.stack(losses).mean().item())


@pytest.fixture(scope="module")
def fabric() -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_matches_hf_loss_single_process(fabric, batch_size):
    model = tiny_llama()
    windows = random_windows(7, 24)  # 7 windows: batch sizes 1 and 3 leave a partial last batch
    expected = hf_perplexity(model, windows)
    module = CausalLMModule(model)
    module.train()
    got = evaluate_perplexity(fabric, module, windows, batch_size=batch_size, progress=False)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-5)
    assert module.training and model.training  # its mode is restored


def test_counts_seqlen_minus_one_tokens_per_window_and_logs_under_trainer():
    model = tiny_llama()
    windows = random_windows(5, 16)
    expected = hf_perplexity(model, windows)
    module = CausalLMModule(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(windows, batch_size=2)
    (val,) = trainer.validate(module, dataloaders=loader, verbose=False)
    (test,) = trainer.test(module, dataloaders=loader, verbose=False)
    assert val["val/ppl"] == pytest.approx(expected, rel=1e-5)
    assert test["test/ppl"] == pytest.approx(expected, rel=1e-5)
    metric = module.val_ppl  # reset by the Trainer at epoch end
    with torch.inference_mode():
        module.update_perplexity(metric, windows)
    assert metric.count.item() == 5 * 15  # seqlen - 1 predicted tokens per window
    assert metric.total_log_probs.dtype == torch.float64
    assert math.exp(metric.total_log_probs.item() / metric.count.item()) == pytest.approx(expected, rel=1e-5)


def _full_logits_sums(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """The NLL sum and count from the whole batch's [B, T, V] logits (the model's own forward)."""
    from fedspallm.lit import new_perplexity_metric

    metric = new_perplexity_metric(sync=False)
    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits
        for i in range(windows.shape[0]):
            metric.update(logits[i : i + 1, :-1].float(), windows[i : i + 1, 1:])
    return metric.total_log_probs.item(), metric.count.item()


def test_head_runs_one_window_at_a_time_with_the_same_sums():
    """The decoder sees the whole batch, the output head one window of T - 1 positions at a time
    (never [B, T, V] logits), and the NLL sum is bitwise the one from the whole batch's logits."""
    from fedspallm.lit import new_perplexity_metric

    model = tiny_llama()
    windows = random_windows(4, 24)
    module = CausalLMModule(model)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    metric = new_perplexity_metric(sync=False)
    with torch.inference_mode():
        module.update_perplexity(metric, windows)
    hook.remove()
    assert module.head_split(windows) == (model.model, model.lm_head)
    assert shapes == [(1, 8, VOCAB), (1, 8, VOCAB)] + [(1, 23, VOCAB)] * 4  # the probe (head, forward), then windows
    assert (metric.total_log_probs.item(), metric.count.item()) == _full_logits_sums(model, windows)


def test_a_model_whose_logits_are_not_the_plain_head_runs_whole():
    """Gemma 2 soft-caps its logits after the head: the probe sees it, and the whole forward is used."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fedspallm.lit import new_perplexity_metric

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=5.0)
    model = Gemma2ForCausalLM(config).eval()
    windows = random_windows(3, 16)
    module = CausalLMModule(model)
    metric = new_perplexity_metric(sync=False)
    with torch.inference_mode():
        module.update_perplexity(metric, windows)
    assert module.head_split(windows) is None
    assert (metric.total_log_probs.item(), metric.count.item()) == _full_logits_sums(model, windows)


@pytest.mark.parametrize("ignore_index", [None, 3])
def test_rowwise_softmax_gives_torchmetrics_states_bit_for_bit(ignore_index):
    """RowwisePerplexity takes the softmax a few rows at a time; its states equal torchmetrics'."""
    from torchmetrics.text import Perplexity

    from fedspallm.lit import RowwisePerplexity

    generator = torch.Generator().manual_seed(0)
    ours = RowwisePerplexity(ignore_index=ignore_index).set_dtype(torch.float64)
    theirs = Perplexity(ignore_index=ignore_index).set_dtype(torch.float64)
    for n in (150, 64, 7):  # rows: not a multiple of 64, exactly 64, fewer
        logits = torch.randn(1, n, 1000, generator=generator) * 8
        target = torch.randint(0, 1000, (1, n), generator=generator)
        target[0, 0] = 3
        ours.update(logits, target)
        theirs.update(logits, target)
        assert ours.total_log_probs.item() == theirs.total_log_probs.item()
        assert ours.count.item() == theirs.count.item()
    assert ours.compute().item() == theirs.compute().item()


def test_bfloat16_model_is_scored_in_float32(fabric):
    model = tiny_llama()
    windows = random_windows(4, 16)
    dense = evaluate_perplexity(fabric, CausalLMModule(model), windows, progress=False)
    half = evaluate_perplexity(fabric, CausalLMModule(model.to(torch.bfloat16)), windows, progress=False)
    assert math.isfinite(half) and half == pytest.approx(dense, rel=2e-2)


def test_eval_dtype_casts_the_parameters_for_the_evaluation_only(fabric):
    model = tiny_llama()
    windows = random_windows(4, 16)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    module = CausalLMModule(model, eval_dtype="bfloat16")
    assert module.evaluation_dtype == "bfloat16" and CausalLMModule(model).evaluation_dtype == "float32"
    got = evaluate_perplexity(fabric, module, windows, progress=False)
    # the same as a copy whose parameters (not buffers) are bfloat16 ...
    expected_model = tiny_llama()
    for p in expected_model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert got == evaluate_perplexity(fabric, CausalLMModule(expected_model), windows, progress=False)
    assert got != evaluate_perplexity(fabric, CausalLMModule(model), windows, progress=False)
    # ... and the float32 model keeps its very tensors, bitwise
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
    # a bfloat16 model evaluated in float32
    up = evaluate_perplexity(fabric, CausalLMModule(expected_model, eval_dtype="float32"), windows, progress=False)
    expected_model.float()
    assert up == evaluate_perplexity(fabric, CausalLMModule(expected_model), windows, progress=False)
    with pytest.raises(UserError, match="eval.dtype='float16'"):
        CausalLMModule(model, eval_dtype="float16")


def test_compute_dtypes_this_device_cannot_use_are_one_clear_line():
    from fedspallm.dtypes import check_compute_dtype

    with pytest.raises(UserError, match="pruning.calibration_dtype=float16: CPUs"):
        check_compute_dtype(torch.float16, torch.device("cpu"), "pruning.calibration_dtype")
    check_compute_dtype(torch.bfloat16, torch.device("cpu"), "eval.dtype")  # supported here
    check_compute_dtype(torch.float32, torch.device("cpu"), "eval.dtype")


def test_rejects_bad_windows(fabric):
    module = CausalLMModule(tiny_llama())
    with pytest.raises(UserError, match="LongTensor"):
        evaluate_perplexity(fabric, module, torch.zeros(2, 8), progress=False)
    with pytest.raises(UserError, match="at least 2 tokens"):
        evaluate_perplexity(fabric, module, random_windows(3, 1), progress=False)
    with pytest.raises(UserError, match="batch_size"):
        evaluate_perplexity(fabric, module, random_windows(3, 8), batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# Two processes, launched the way users launch them: `fabric run --devices 2` (gloo on CPU).


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_windows_and_agree(tmp_path):
    model = tiny_llama()
    windows = random_windows(7, 16)  # 7 windows over 2 ranks: shards of 4 and 3
    assert len({tuple(w.tolist()) for w in windows}) == len(windows)
    model.save_pretrained(tmp_path / "model")
    torch.save(windows, tmp_path / "windows.pt")
    expected = evaluate_perplexity(L.Fabric(accelerator="cpu", devices=1), CausalLMModule(model),
                                   windows, batch_size=2, progress=False)

    cli = "import sys; from lightning.fabric.cli import _main; sys.exit(_main())"
    command = [sys.executable, "-c", cli, "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
               "--main-port", str(_free_port()), __file__,
               str(tmp_path / "model"), str(tmp_path / "windows.pt"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    # The ranks' own errors come first on stderr, the launcher's summary last: keep both ends.
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[:4000] + "\n...\n" + done.stderr[-2000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["ppl"] == ranks[1]["ppl"]  # every rank returns the same float
    assert ranks[0]["ppl"] == pytest.approx(expected, rel=1e-6)
    seen = [r["seen"] for r in ranks]
    assert seen == [[0, 2, 4, 6], [1, 3, 5]]  # windows[r::2]: disjoint, and together all 7, once each
    assert sorted(seen[0] + seen[1]) == list(range(len(windows)))


def _worker(model_dir: str, windows_path: str, out_dir: str) -> None:
    fabric = L.Fabric()  # accelerator, devices and strategy come from `fabric run`
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    windows = torch.load(windows_path)
    rows = {tuple(w.tolist()): i for i, w in enumerate(windows)}
    seen: list[int] = []
    # The decoder sees every window (the output head runs per window); the 8-token probe of
    # CausalLMModule.head_split is not a window.
    model.get_decoder().register_forward_pre_hook(
        lambda _mod, _args, kwargs: seen.extend(rows[tuple(w.tolist())] for w in kwargs["input_ids"]
                                                if len(w) == windows.shape[1]),
        with_kwargs=True,
    )
    ppl = evaluate_perplexity(fabric, CausalLMModule(model), windows, batch_size=2, progress=True)
    record = {"rank": fabric.global_rank, "world_size": fabric.world_size, "ppl": ppl, "seen": seen}
    Path(out_dir, f"rank{fabric.global_rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# The embedded default model on real English text.

PASSAGES = """\
The old harbour town wakes before the sun. Fishing boats slip out past the breakwater while the
bakery on the square lights its ovens, and by the time the first bus arrives from the valley the
smell of fresh bread has reached the station. Most visitors come for the cliffs, but the people who
live here will tell you that the best part of the day is the hour after dawn, when the gulls are loud
and the streets are still empty.

In the nineteenth century the town grew rich on herring. Warehouses were built along the quay,
and a narrow railway carried salted fish inland to the markets of the industrial cities. When the
herring disappeared in the nineteen fifties, the warehouses were abandoned one by one. Some of them
have since been turned into flats, a museum and a small theatre that puts on plays every summer.

The museum tells the story of the fishing families through letters, photographs and tools. One room
is given over to the great storm of 1881, which sank eleven boats in a single night. A wall of names
lists the men who were lost, and visitors often stand in front of it for a long time without speaking.
Upstairs, a model of the harbour shows how the quay looked before the railway was built.

Walking north from the harbour, a path climbs steeply through gorse and heather to the top of the
cliffs. On a clear day you can see the islands on the horizon, and in spring the ledges below are
crowded with nesting seabirds. Puffins are the favourite of most walkers, though they are shy and
easy to miss. Guides recommend bringing binoculars, a warm jacket and plenty of water, because the
weather changes quickly and there is nowhere to shelter for several miles.

Scientists have studied the seabird colonies here for more than forty years. Their records show that
the number of birds has fallen sharply since the nineteen nineties, mostly because the small fish that
the chicks depend on have moved to colder water further north. Researchers now fit some birds with
tiny tracking devices to learn where they feed, and the results have surprised them: some adults fly
more than a hundred kilometres from the nest in a single trip.

Back in town, the evening is quieter. Families eat on the benches by the harbour wall, children
chase each other around the war memorial, and the last boats come home with the tide. The lighthouse
at the end of the breakwater has been automatic for decades, but a retired keeper still climbs the
stairs every Sunday to polish the brass and check that everything is in order. He says the light has
never failed, and he intends to keep it that way.
"""


@pytest.mark.integration
def test_default_model_on_english_text(tmp_path, fabric):
    from fedspallm.config import ModelConfig
    from fedspallm.models import load_model

    path = tmp_path / "passages.txt"
    path.write_text(PASSAGES)
    loaded = load_model(ModelConfig())
    ids = loaded.tokenizer(path.read_text(), return_tensors="pt").input_ids[0]
    seqlen = 128
    n = ids.numel() // seqlen  # non-overlapping windows; the remainder is dropped
    assert n >= 4
    windows = ids[: n * seqlen].reshape(n, seqlen)
    expected = hf_perplexity(loaded.model, windows)
    got = evaluate_perplexity(fabric, CausalLMModule(loaded.model), windows, batch_size=3, progress=False)
    assert 1 < expected < 200  # a working model on plain English
    assert got == pytest.approx(expected, rel=1e-3)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
