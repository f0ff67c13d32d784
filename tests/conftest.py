"""Shared fixtures: tiny checkpoints written into tmp_path, tiny real architectures, CLI runner."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))
# A thread count of our choosing: the CLI then keeps it (deltakit.device.host.threads_for_free_cores lowers it
# to the free cores otherwise), so outputs compared to 1e-9 do not depend on what else the machine runs.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the `deltakit` group in-process; returns click's Result."""
    from deltakit_cli.main import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)


# A progress line on a stderr that is not a terminal (deltakit.progress): "ΔW spectra 3/30, 10.0 s", "... 30/30 in 1.2 s".
PROGRESS_LINE = re.compile(r"^\S.* \d+/\d+(, | in )\d+\.\d s$")


def assert_one_line_error(result, contains: str = "") -> None:
    """A user error: non-zero exit, exactly one `Error:` line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err_lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(err_lines) == 1 and err_lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert contains.lower() in err_lines[0].lower(), err_lines[0]


def finishes_within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a daemon thread; the exception it raised (None if none), or fail if it still blocks after
    ``seconds`` (a hang detector: what it runs returns in milliseconds)."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


def low_rank(m: int, n: int, rank: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """An m×n fp64 matrix of exactly ``rank`` with singular values scale·(rank, rank-1, ..., 1)."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
    sigma = scale * torch.arange(rank, 0, -1, dtype=torch.float64)
    return (u * sigma) @ v.T


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_gpt_oss(layers: int = 2, seed: int = 0):
    """A transformers gpt-oss (fused experts, stored input-major) of 4 experts, hidden 32; the experts'
    weights are N(0, 0.02) (transformers leaves them at zero)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=8, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * layers)
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:
                param.normal_(0.0, 0.02)
    return model


def tiny_bert(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).to(dtype).eval()


def merged_lora_copy(model, target_modules: list[str], rank: int, seed: int = 1, b_scale: float = 1.0,
                     fan_in_fan_out: bool = False):
    """(merged model, peft model before merging): a PEFT LoRA with non-zero B, merged by PEFT itself."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, init_lora_weights=False,
                        fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(copy.deepcopy(model).float(), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05 * b_scale)
    dtype = next(model.parameters()).dtype
    merged = copy.deepcopy(peft_model).merge_and_unload().to(dtype)
    return merged, peft_model


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def run_notebook(path: Path, work: Path, env: dict[str, str]):
    """Execute a notebook with nbclient in ``work`` with ``env`` set for its kernel; outputs stay in memory.

    BLAS and OpenMP run single-threaded: their threads spin-waiting on a busy shared CPU are
    many times slower than one thread.
    """
    import nbclient
    import nbformat

    env = {"MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", **env}
    with environment(env):
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(work)}}).execute()
        return notebook


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """``env`` set in os.environ for the block, each variable restored (or removed) afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield


def fast_notebook_env(out: Path, blank: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment of the MiniLM notebooks (02, 03) in fast mode on the CPU, writing into ``out``.

    ``blank`` names variables cleared so that a developer's own settings cannot leak in.
    """
    repo = Path(__file__).resolve().parents[1]
    return {
        "DELTAKIT_NOTEBOOK_FAST": "1",
        "DELTAKIT_NB_OUT": str(out),
        "DELTAKIT_NB_DEVICE": "cpu",
        "PYTHONPATH": os.pathsep.join([str(repo / "notebooks"), str(repo), os.environ.get("PYTHONPATH", "")]),
        **{name: "" for name in blank},
    }
