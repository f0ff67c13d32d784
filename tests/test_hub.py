"""Hub ids that download: `deltakit rank org/base org/ft` against a stand-in Hub on 127.0.0.1.

The CLI runs in a subprocess whose environment points huggingface_hub at the stand-in
(HF_ENDPOINT) and at a fresh cache (HF_HUB_CACHE): huggingface_hub reads both when imported.
The stand-in logs every request, so "what was downloaded" is counted, not guessed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from deltakit import __version__
from deltakit.errors import DeltakitError
from deltakit.io import hub
from deltakit.io.hub import HubId, choose_files, parse_hub_id

from conftest import assert_one_line_error, invoke, low_rank
from hub_server import HubStandIn, Repo

Q, UP, NORM = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16}).encode()
JUNK_PICKLE = b"\x80\x04not really a pickle, and never to be downloaded"


def base_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {Q: torch.randn(16, 16, generator=generator), UP: torch.randn(32, 16, generator=generator),
            NORM: torch.ones(16)}


def ft_tensors(q_rank: int, up_rank: int) -> dict[str, torch.Tensor]:
    out = base_tensors()
    out[Q] = out[Q] + low_rank(16, 16, q_rank, seed=1).float()
    out[UP] = out[UP] + low_rank(32, 16, up_rank, seed=2).float()
    return out


def sharded(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Two safetensors shards and their index, as a repository's files."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    files = {shard: save({n: tensors[n] for n in members}) for shard, members in shards.items()}
    index = {"metadata": {}, "weight_map": {n: shard for shard, members in shards.items() for n in members}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


@pytest.fixture
def stand_in():
    """org/base (one file, tokenizer, a pickle twin), org/ft (sharded; main: ranks 2/3, tag v1: ranks 1/1)."""
    server = HubStandIn()
    extras = {"config.json": CONFIG, "pytorch_model.bin": JUNK_PICKLE, "README.md": b"# base\n",
              "tokenizer.json": b'{"version": "1.0"}', "generation_config.json": b'{"do_sample": false}',
              "onnx/model.onnx": b"onnx bytes"}
    server.repos["org/base"] = base = Repo()
    base.add_commit({"model.safetensors": save(base_tensors()), **extras})
    server.repos["org/ft"] = ft = Repo()
    ft.add_commit({**sharded(ft_tensors(1, 1)), "config.json": CONFIG}, "v1")
    ft.add_commit({**sharded(ft_tensors(2, 3)), "config.json": CONFIG, "pytorch_model.bin": JUNK_PICKLE,
                   "tokenizer.json": b"{}"}, "main")
    server.repos["org/gated"] = Repo(gated=True)
    server.repos["org/gated"].add_commit({"model.safetensors": save(base_tensors()), "config.json": CONFIG})
    server.repos["org/pickles"] = Repo()
    server.repos["org/pickles"].add_commit({"pytorch_model.bin": JUNK_PICKLE, "config.json": CONFIG})
    yield server.start()
    server.stop()


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"),
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               **extra)
    return env


def deltakit(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltakit_cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess, contains: str) -> str:
    """Exit 1 and exactly one line on stderr, `Error: ...`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def cached_files(tmp_path: Path, repo_id: str) -> set[str]:
    snapshots = tmp_path / "cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.name for p in snapshots.glob("*/*")}


def rounded(value):
    """Floats to 6 significant digits, recursively: a report from another process may differ in the last
    bits (BLAS threads, the randomized SVD behind `amplification`), never in what a reader sees."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def matrices(report: dict) -> dict[str, dict]:
    return {m["name"]: rounded(m) for m in report["matrices"]}


@pytest.fixture
def online(stand_in, tmp_path, monkeypatch):
    """This process talks to the stand-in: HF_ENDPOINT and the cache are read when a hub id resolves, and
    huggingface_hub's offline switch (read when it was imported, on in conftest) is turned off."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_listings", {})
    return stand_in


def local_pair(folder: Path, ft: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    for name, tensors in (("base", base_tensors()), ("ft", ft)):
        (folder / name).mkdir(parents=True)
        save_file(tensors, folder / name / "model.safetensors")
        (folder / name / "config.json").write_bytes(CONFIG)
    return folder / "base", folder / "ft"


def test_rank_downloads_safetensors_and_configs_only_then_reads_the_cache(online, runner, tmp_path):
    """The acceptance run: first as a user types it (a fresh process, huggingface_hub configured by the
    environment), then again in this process, which makes no transfer, then --offline, which asks nothing."""
    env = hub_env(tmp_path, online.url)
    result = deltakit(env, "rank", "org/base", "org/ft", "--json", tmp_path / "hub.json", "-q", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # off a terminal: no download bars (this download is small), only the log's closing progress line
    assert re.fullmatch(r"ΔW spectra 3/3 in \d+\.\d s\n", result.stderr), result.stderr
    assert cached_files(tmp_path, "org/base") == {"config.json", "model.safetensors"}
    assert cached_files(tmp_path, "org/ft") == {"config.json", "model.safetensors.index.json",
                                                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    fetched = online.file_gets()
    assert len(fetched) == 6 and not any(p.endswith((".bin", ".md", "tokenizer.json", ".onnx")) for p in fetched)
    # The same report as on local folders holding the same weights.
    from deltakit.analyses.rank import rank
    from deltakit.spectral.options import SpectralOptions

    # on the CPU as the command above ran: on a GPU machine "auto" would compare two devices' rounding
    from_disk = rank(*local_pair(tmp_path / "local", ft_tensors(2, 3)), (0.9,), SpectralOptions(device="cpu")).to_dict()
    from_hub = json.loads((tmp_path / "hub.json").read_text())
    assert matrices(from_hub) == matrices(from_disk) and rounded(from_hub["summary"]) == rounded(from_disk["summary"])
    assert matrices(from_hub)[Q]["rank"] == 2 and matrices(from_hub)[UP]["rank"] == 3
    # Second run: one metadata request per repository, no file transfer.
    online.clear()
    assert invoke(runner, "rank", "org/base", "org/ft", "-q", "--device", "cpu").exit_code == 0
    assert online.file_gets() == [] and {p for _, p, _ in online.requests} == {"/api/models/org/base",
                                                                              "/api/models/org/ft"}
    # --offline: no request at all, the same answer from the cache.
    online.clear()
    result = invoke(runner, "rank", "org/base", "org/ft", "--json", "-", "--device", "cpu", "--offline")
    assert result.exit_code == 0, result.output
    assert online.requests == [] and matrices(json.loads(result.stdout)) == matrices(from_hub)


def test_offline_without_the_cache(online, runner, tmp_path):
    assert invoke(runner, "rank", "org/base", "org/ft", "-q", "--device", "cpu").exit_code == 0
    online.clear()
    result = invoke(runner, "rank", "org/base", "org/gated", "--offline")
    assert_one_line_error(result, f"org/gated is not in the local Hugging Face cache ({tmp_path / 'cache'}) and "
                                  "offline mode forbids downloading")
    assert online.requests == []


def test_revision_pinning_by_tag_and_commit(online, runner, tmp_path):
    tagged = invoke(runner, "rank", "org/base", "org/ft@v1", "--json", "-", "--device", "cpu")
    assert tagged.exit_code == 0, tagged.output
    ranks = {name: m["rank"] for name, m in matrices(json.loads(tagged.stdout)).items()}
    assert ranks[Q] == 1 and ranks[UP] == 1  # the tag's weights, not main's (2 and 3)
    v1 = online.repos["org/ft"].refs["v1"]
    ft_gets = [path for path in online.file_gets() if path.startswith("/org/ft/")]
    assert len(ft_gets) == 4 and all(f"/resolve/{v1}/" in path for path in ft_gets)
    assert (tmp_path / "cache" / "models--org--ft" / "refs" / "v1").read_text() == v1
    online.clear()
    by_commit = invoke(runner, "rank", "org/base", f"org/ft@{v1}", "--json", "-", "--device", "cpu", "--offline")
    assert by_commit.exit_code == 0, by_commit.output
    assert matrices(json.loads(by_commit.stdout)) == matrices(json.loads(tagged.stdout)) and online.requests == []
    assert_one_line_error(invoke(runner, "rank", "org/base", "org/ft@v9"),
                          "org/ft has no revision 'v9' (expected a branch, tag or commit hash)")


def test_missing_repo_gated_repo_and_pickles(online, runner, monkeypatch):
    assert_one_line_error(invoke(runner, "rank", "org/base", "org/absent"),
                          f"org/absent: no such local folder, and no model repository of that name on the Hub "
                          f"({online.url}) (if it is private, log in")
    assert_one_line_error(invoke(runner, "rank", "org/gated", "org/base"),
                          f"org/gated is a gated repository: accept its terms at {online.url}/org/gated, "
                          "then log in with `hf auth login` or set HF_TOKEN")
    assert_one_line_error(invoke(runner, "rank", "org/base", "org/pickles"), "holds PyTorch pickles only")
    assert not any(p.endswith(".bin") for p in online.file_gets())
    # With a token the gated repository downloads (the stand-in only checks that one is sent).
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert invoke(runner, "rank", "org/gated", "org/base", "-q", "--device", "cpu").exit_code == 0


def test_no_network(online, runner, monkeypatch):
    """Connection refused: one line for what is not cached; what is cached still serves."""
    assert invoke(runner, "rank", "org/base", "org/ft", "-q", "--device", "cpu").exit_code == 0
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(hub, "_listings", {})
    assert_one_line_error(invoke(runner, "rank", "org/base", "org/new"),
                          f"org/new is not in the local Hugging Face cache ({os.environ['HF_HUB_CACHE']}) and the Hub "
                          f"at {closed} cannot be reached")
    assert invoke(runner, "rank", "org/base", "org/ft", "-q", "--device", "cpu").exit_code == 0


@pytest.mark.parametrize("mode", ["resume", "fail"])
def test_interrupted_transfer(online, runner, tmp_path, mode):
    """The connection drops half-way through a shard: huggingface_hub resumes it, or the command fails cleanly."""
    shard = "model-00002-of-00002.safetensors"
    online.cut[("org/ft", shard)] = mode
    result = invoke(runner, "rank", "org/base", "org/ft", "--json", "-", "--device", "cpu")
    blobs = list((tmp_path / "cache" / "models--org--ft" / "blobs").iterdir())
    assert not [b for b in blobs if b.name.endswith(".incomplete")]
    ranges = [r for m, p, r in online.requests if m == "GET" and p.endswith(shard)]
    if mode == "resume":
        assert result.exit_code == 0, result.output
        assert matrices(json.loads(result.stdout))[UP]["rank"] == 3
        assert len(ranges) == 2  # the cut transfer, then huggingface_hub's retry
    else:
        assert_one_line_error(result, f"downloading {shard} of org/ft failed: the Hub answered HTTP 503")
        assert shard not in cached_files(tmp_path, "org/ft")  # nothing half-written under its name
        assert len(blobs) == 3  # config, index, first shard: complete files only
        assert_one_line_error(invoke(runner, "rank", "org/base", "org/ft", "--offline"),
                              "org/ft is only partly in the local Hugging Face cache")


def test_extract_writes_a_model_card_and_merge_fetches_tokenizer_files(online, runner, tmp_path):
    """extract from Hub ids writes a card that PEFT and huggingface_hub read; merging the published adapter into
    the Hub base copies the tokenizer and generation config (downloaded for that), never the pickle."""
    adapter = tmp_path / "lora"
    result = invoke(runner, "extract", "org/base", "org/ft@v1", "-o", adapter, "--rank", "1", "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config["revision"] is None
    from huggingface_hub import ModelCard
    from peft import LoraConfig

    card = ModelCard.load(adapter / "README.md")
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert "`org/ft@v1` (fine-tune)" in card.text and "rank 1 for every changed matrix" in card.text
    assert f"deltakit {__version__}" in card.text and "relative error" in card.text
    assert LoraConfig.from_pretrained(adapter).base_model_name_or_path == "org/base"
    # The adapter, published, merges back into the base from the Hub.
    online.repos["org/lora"] = Repo()
    online.repos["org/lora"].add_commit({**{p.name: p.read_bytes() for p in adapter.iterdir()},
                                         "adapter_model.bin": JUNK_PICKLE})
    online.clear()
    merged = tmp_path / "merged"
    result = invoke(runner, "merge", "org/base", "org/lora", "-o", merged, "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in merged.iterdir()}
    assert not any(p.endswith((".bin", ".onnx", "README.md")) for p in online.file_gets())
    assert cached_files(tmp_path, "org/lora") == {"adapter_config.json", "adapter_model.safetensors"}


def test_extract_from_a_pinned_base_records_the_revision(online, tmp_path):
    from deltakit.lora import extract_lora

    base_commit = online.repos["org/base"].refs["main"]
    report = extract_lora(f"org/base@{base_commit}", "org/ft", tmp_path / "lora", rank=2)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config["revision"] == base_commit
    # Q's ΔW has singular values (2, 1), UP's (3, 2, 1): rank 2 leaves out only UP's last, σ = 1.
    assert report.relative_error == pytest.approx((1 / (2**2 + 1 + 3**2 + 2**2 + 1)) ** 0.5, rel=1e-4)


def test_parse_hub_id():
    assert parse_hub_id("meta-llama/Llama-2-7b-hf") == HubId("meta-llama/Llama-2-7b-hf")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == HubId("org/name", "refs/pr/3")
    assert str(HubId("org/name", "dev")) == "org/name@dev"
    for local in ("./org/name", "/abs/path", "~/models/x", "dir/model.safetensors", "dir/pytorch_model.bin",
                  "a/b/c", "name", "org/na me", "org/../x"):
        assert parse_hub_id(local) is None, local


def test_choose_files_mirrors_open_checkpoint():
    sizes = dict.fromkeys(["config.json", "model.safetensors.index.json", "model-1.safetensors",
                           "pytorch_model.bin", "README.md", "sub/model.safetensors"], 1)
    assert choose_files(sizes, allow_pickle=True) == ["config.json", "model.safetensors.index.json"]
    assert choose_files(dict.fromkeys(["config.json", "model.safetensors", "consolidated.safetensors"], 1),
                        False) == ["config.json", "model.safetensors"]
    assert choose_files(dict.fromkeys(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"], 1),
                        False) == ["adapter_config.json", "adapter_model.safetensors"]
    assert choose_files(dict.fromkeys(["a.safetensors", "b.safetensors", "x/c.safetensors"], 1), False) == [
        "a.safetensors", "b.safetensors"]
    assert choose_files(dict.fromkeys(["config.json", "pytorch_model.bin", "training_args.bin"], 1), True) == [
        "config.json", "pytorch_model.bin"]
    assert choose_files(dict.fromkeys(["config.json", "weights.pt"], 1), True) == ["config.json", "weights.pt"]
    assert choose_files(dict.fromkeys(["config.json", "pytorch_model.bin"], 1), False, weights=False) == ["config.json"]
    with pytest.raises(DeltakitError, match="--allow-pickle"):
        choose_files(dict.fromkeys(["config.json", "pytorch_model.bin"], 1), False, label="org/x")
    with pytest.raises(DeltakitError, match="no weights"):
        choose_files({"README.md": 1}, True, label="org/x")


def test_large_download_is_announced_and_quiet_is_quiet(online, monkeypatch, capsys):
    monkeypatch.setattr(hub, "LARGE_DOWNLOAD_BYTES", 1)
    with hub.hub_settings(progress=False):
        hub.resolve_hub_id(HubId("org/ft", "v1"))
    assert capsys.readouterr().err == ""
    folder = hub.resolve_hub_id(HubId("org/base"))
    err = capsys.readouterr().err.strip().splitlines()
    size = len(save(base_tensors())) + len(CONFIG)
    assert len(err) == 1 and err[0].startswith("downloading org/base (commit ") and "2 files" in err[0]
    assert f"{size / 1000:.1f} kB" in err[0] and (folder / "model.safetensors").is_file()


def test_full_disk_during_download(online, monkeypatch):
    """The disk fills half-way through a file: one line saying so; no partial file is left in the cache."""
    from huggingface_hub import file_download

    def fill_disk(url, temp_file, **kwargs):
        temp_file.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", fill_disk)
    with pytest.raises(DeltakitError, match=r"no space left on the disk while downloading config.json of org/base "
                                            r"into .*HF_HUB_CACHE"):
        hub.resolve_hub_id(HubId("org/base"))
    assert [p.name for p in Path(os.environ["HF_HUB_CACHE"]).rglob("*") if p.is_file() and "blobs" in p.parts] == []


def test_too_little_disk_space_is_refused_before_downloading(online, monkeypatch):
    monkeypatch.setattr(hub, "_free_bytes", lambda folder: 1000)
    size = len(save(base_tensors())) + len(CONFIG)
    with pytest.raises(DeltakitError, match=rf"downloading org/base needs {size / 1000:.1f} kB in .*, which has "
                                            r"1.0 kB free: free some space, or point HF_HUB_CACHE"):
        hub.resolve_hub_id(HubId("org/base"))
    assert online.file_gets() == []


def test_plot_reads_the_hub_ids_a_spectra_file_records(online, runner, tmp_path):
    spectra = tmp_path / "spectra.safetensors"
    assert invoke(runner, "rank", "org/base", "org/ft@v1", "--save-spectra", spectra, "-q", "--device", "cpu",
                  ).exit_code == 0
    result = invoke(runner, "plot", spectra, "-o", tmp_path / "q.png", "--kind", "spectrum", "--matrix", Q,
                    "--offline")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q.png").stat().st_size > 0


def test_card_of_an_adapter_from_local_folders_names_no_hub_base(tmp_path):
    from deltakit.lora import extract_lora

    base, ft = local_pair(tmp_path / "local", ft_tensors(2, 3))
    extract_lora(base, ft, tmp_path / "lora", energy=0.5, max_rank=4)
    card = (tmp_path / "lora" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model" not in front
    assert "energy 0.5 of ‖ΔW‖²_F kept per matrix (max rank 4)" in card and f"`{base}` (base)" in card
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["revision"] is None
