"""Hugging Face Hub ids: ``org/name`` or ``org/name@revision`` resolved to a folder of the local cache.

What a command reads is downloaded with huggingface_hub (its cache layout, tokens from
``HF_TOKEN`` or ``hf auth login``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``), and nothing else:
``config.json``, the safetensors index and its shards (or the one weight file), PEFT adapter
files; pickles only with ``allow_pickle``. Every file comes from one commit, so a branch that
moves during a download cannot mix two versions. A second run only asks the Hub which commit
the revision names (one small request); with ``offline`` it asks nothing.

Longer than ~450 lines: resolving a Hub id is one concern whose parts must agree (which files a
command needs, one commit for all of them, the offline cache's rules, the download's progress and
free-space check, and the one-line errors for each way it fails); split, each part would import
the others.

Example::

    folder = resolve_hub_id(parse_hub_id("meta-llama/Llama-2-7b-hf"))   # a snapshot folder
    with hub_settings(offline=True):                                    # cache only
        folder = resolve_hub_id(parse_hub_id("org/name@v1.0"))
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from deltakit.errors import DeltakitError
from deltakit.io.filenames import ADAPTER_CONFIG, PICKLE_INDEX, PICKLE_SUFFIXES, SAFETENSORS_INDEX
from deltakit.io.json_files import read_json, validate_shard_index

CONFIG_FILES = ("config.json", ADAPTER_CONFIG)
# Downloads at least this large are announced on stderr (files, bytes, where) before they start.
LARGE_DOWNLOAD_BYTES = 100 * 10**6

# huggingface_hub imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns "IProgress not found"
# (deltakit shows its own notebook progress, deltakit.progress, and no tqdm bar): the warning is noise there.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

_REPO = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+"
_HUB_ID = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<revision>[^@\s]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubId:
    """A model repository on the Hub and the revision to read (branch, tag or commit; None: main)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class HubSettings:
    """How hub ids resolve: ``offline`` forbids the network; ``progress`` shows bars and the size line;
    ``revision`` is read for every hub id given without ``@revision`` (the CLI's ``--revision``)."""

    offline: bool = False
    progress: bool = True
    revision: str | None = None


_settings = HubSettings()
_listings: dict[tuple[str, str, str, str], "_Listing"] = {}


@dataclass(frozen=True)
class _Listing:
    """The files of one commit of a repository: name -> size in bytes (None when the Hub did not say)."""

    commit: str
    sizes: dict[str, int | None]


@contextlib.contextmanager
def hub_settings(offline: bool = False, progress: bool = True, revision: str | None = None) -> Iterator[HubSettings]:
    """Resolve hub ids with these settings inside the block (the CLI's --offline, --quiet and --revision)."""
    global _settings
    previous, _settings = _settings, HubSettings(offline=offline, progress=progress, revision=revision or None)
    try:
        yield _settings
    finally:
        _settings = previous


def parse_hub_id(text: str | os.PathLike) -> HubId | None:
    """``org/name`` or ``org/name@revision`` -> HubId; None for anything that reads as a local path.

    The caller checks first that no local file or folder of that name exists.
    """
    text = os.fspath(text)
    if text.startswith((".", "/", "~", "\\")):
        return None
    match = _HUB_ID.match(text)
    if not match:
        return None
    repo = match["repo"]
    if repo.endswith((".safetensors", ".json") + PICKLE_SUFFIXES) or ".." in repo or "--" in repo:
        return None
    return HubId(repo, match["revision"])


def resolve_path(path: str | os.PathLike, allow_pickle: bool = False, weights: bool = True) -> Path:
    """Turn a local path, or a Hub id ``org/name[@revision]``, into a path on this machine.

    A local file or folder wins over a hub id of the same name. A path that looks local (it starts
    with ``.``, ``/`` or ``~``, or its first folder exists here, as ``demo`` of a mistyped
    ``demo/bse``) and does not exist is "no such file or folder", never a Hub lookup. Anything else
    of the form ``org/name`` resolves to its snapshot in the Hugging Face cache, downloading the
    configs and (with ``weights``) the weight files a command reads; see :mod:`deltakit.io.hub`
    (offline: the cache only). A failure then says that the local path was tried first.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    hub_id = hub_id_of(path)
    if hub_id is None or looks_local(path):
        raise DeltakitError(f"{path}: no such file or folder{_nearest_hint(local)}")
    try:
        return resolve_hub_id(hub_id, allow_pickle=allow_pickle, weights=weights)
    except DeltakitError as exc:
        raise DeltakitError(f"{path} is not a local file or folder, so it was read as a Hub id: {exc}") from None


def looks_local(path: str | os.PathLike) -> bool:
    """True for a path that names something on this machine: it starts with ``.``, ``/``, ``~`` or a
    drive, or its first component is a folder here (``demo/bse`` where ``demo/`` exists)."""
    text = os.fspath(path)
    if text.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return len(Path(text).parts) > 1 and Path(first).is_dir()


def _nearest_hint(missing: Path) -> str:
    """``; demo holds base, ft`` for a mistyped name: what the deepest existing parent folder holds."""
    parent = missing.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or str(parent) in (".", "/"):
        return ""
    try:
        names = sorted(entry.name for entry in parent.iterdir() if not entry.name.startswith("."))
    except OSError:
        return ""
    if not names:
        return f" ({parent} is empty)"
    return f" ({parent} holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"


def hub_id_of(text: str | os.PathLike) -> HubId | None:
    """:func:`parse_hub_id`, with the settings' revision (``--revision``) where the id names none."""
    return _with_default_revision(parse_hub_id(text))


def _with_default_revision(hub_id: HubId | None) -> HubId | None:
    if hub_id is None or hub_id.revision or not _settings.revision:
        return hub_id
    return HubId(hub_id.repo_id, _settings.revision)


def base_model_fields(path: str | os.PathLike) -> dict[str, str]:
    """PEFT config fields naming a base that came from the Hub: {"base_model_name_or_path", "revision"}.

    Empty for a local path, which then stays as given.
    """
    if Path(path).expanduser().exists() or looks_local(path):
        return {}
    hub_id = hub_id_of(path)
    if hub_id is None:
        return {}
    fields = {"base_model_name_or_path": hub_id.repo_id}
    if hub_id.revision:
        fields["revision"] = hub_id.revision
    return fields


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub_id(hub_id: HubId, allow_pickle: bool = False, weights: bool = True) -> Path:
    """The snapshot folder of ``hub_id`` holding its configs and (with ``weights``) its weight files.

    Downloads what is missing, unless offline (--offline or HF_HUB_OFFLINE=1), in which case
    the cache must already hold it. Raises DeltakitError with one actionable line.
    """
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DeltakitError(f"{hub_id}: no such file or folder (install huggingface_hub to read hub ids)")
    if _offline():
        return _from_cache(hub_id, allow_pickle, weights, reason="offline mode forbids downloading")
    try:
        listing = _listing(hub_id)
    except DeltakitError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line below
        status = getattr(getattr(exc, "response", None), "status_code", None) or 0
        if (_is_connection_error(exc) or status >= 500) and _cached_snapshot(hub_id) is not None:
            # No network, or the Hub is down: the cached snapshot serves, as it does for transformers.
            return _from_cache(hub_id, allow_pickle, weights, reason=_unreachable(exc))
        raise DeltakitError(hub_error_message(exc, hub_id)) from None
    folder = cache_dir() / _repo_folder(hub_id.repo_id) / "snapshots" / listing.commit
    wanted = choose_files(listing.sizes, allow_pickle, weights, str(hub_id))
    _download(hub_id, listing, folder, wanted)
    index = next((name for name in wanted if name in (SAFETENSORS_INDEX, PICKLE_INDEX)), None)
    if index is not None:
        _download(hub_id, listing, folder, shards_of(folder / index, listing.sizes, str(hub_id)))
    return folder


def fetch_files(hub_id: HubId, wanted: Callable[[str], bool]) -> None:
    """Download the top-level files of ``hub_id`` whose names ``wanted`` accepts (tokenizer, generation config...).

    For commands that copy them into their output; offline, whatever the cache holds is used.
    """
    if _offline():
        return
    try:
        listing = _listing(hub_id)
    except Exception as exc:  # noqa: BLE001
        if _is_connection_error(exc):
            return
        raise DeltakitError(hub_error_message(exc, hub_id)) from None
    folder = cache_dir() / _repo_folder(hub_id.repo_id) / "snapshots" / listing.commit
    _download(hub_id, listing, folder, [name for name in listing.sizes if "/" not in name and wanted(name)])


def choose_files(sizes: dict[str, int | None], allow_pickle: bool, weights: bool = True, label: str = "") -> list[str]:
    """Which files of a repository a command reads, in the order :func:`open_checkpoint` looks for them.

    Configs always; with ``weights``: the safetensors index (its shards follow from it), else
    ``model.safetensors``, else ``adapter_model.safetensors``, else every top-level
    ``*.safetensors``; pickles (index, ``pytorch_model.bin``, ``adapter_model.bin``, else every
    top-level pickle) only with ``allow_pickle``.
    """
    top = sorted(name for name in sizes if "/" not in name)
    chosen = [name for name in CONFIG_FILES if name in sizes]
    if not weights:
        return chosen
    for single in (SAFETENSORS_INDEX, "model.safetensors", "adapter_model.safetensors"):
        if single in sizes:
            return chosen + [single]
    loose = [name for name in top if name.endswith(".safetensors")]
    if loose:
        return chosen + loose
    pickles = [name for name in top if name.endswith(PICKLE_SUFFIXES)]
    if PICKLE_INDEX in sizes or pickles:
        if not allow_pickle:
            first = PICKLE_INDEX if PICKLE_INDEX in sizes else pickles[0]
            raise DeltakitError(f"{label} holds PyTorch pickles only ({first}), which can run code when loaded; "
                                "pass --allow-pickle to download and load them with torch.load(weights_only=True)")
        named = [name for name in (PICKLE_INDEX, "pytorch_model.bin", "adapter_model.bin") if name in sizes]
        return chosen + (named[:1] or pickles)  # not training_args.bin and the like when the weights are named
    raise DeltakitError(f"{label} holds no weights deltakit reads (no *.safetensors, and no *.bin with --allow-pickle)")


def shards_of(index_path: Path, sizes: dict[str, int | None], label: str) -> list[str]:
    """The shard files a downloaded index names, checked against the repository's listing."""
    shards = sorted(set(validate_shard_index(read_json(index_path), index_path)["weight_map"].values()))
    missing = [name for name in shards if name not in sizes]
    if missing:
        raise DeltakitError(f"{label}: {index_path.name} names shard {missing[0]}, which is missing")
    return shards


def hub_error_message(exc: BaseException, hub_id: HubId, filename: str | None = None) -> str:
    """One line a user can act on, for a failure of huggingface_hub (or the disk) while resolving ``hub_id``."""
    from huggingface_hub import errors

    what = f"{filename} of {hub_id}" if filename else str(hub_id)
    endpoint = _endpoint_url()
    if any(isinstance(cause, errors.OfflineModeIsEnabled) for cause in _causes(exc)):
        return _not_cached(hub_id, "offline mode forbids downloading")
    if _is_connection_error(exc):
        return _not_cached(hub_id, _unreachable(exc))
    if isinstance(exc, errors.GatedRepoError):
        if _has_token():
            return (f"{hub_id.repo_id} is a gated repository and your token has no access to it: "
                    f"request access at {endpoint}/{hub_id.repo_id}")
        return (f"{hub_id.repo_id} is a gated repository: accept its terms at {endpoint}/{hub_id.repo_id}, "
                "then log in with `hf auth login` or set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        login = "" if _has_token() else " (if it is private, log in with `hf auth login` or set HF_TOKEN)"
        return (f"{hub_id.repo_id}: no such local folder, and no model repository of that name on the Hub "
                f"({endpoint}){login}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{hub_id.repo_id} has no revision {hub_id.revision!r} (expected a branch, tag or commit hash)"
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return f"{what}: the file is not in the repository"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"the Hub refused access to {what} (HTTP {status}): check the token in HF_TOKEN "
                "or log in again with `hf auth login`")
    if status is not None:
        return f"downloading {what} failed: the Hub answered HTTP {status}; run the command again later"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk while downloading {what} into {cache_dir()}: "
                "free some space, or point HF_HUB_CACHE at a larger disk")
    if _is_interruption(exc):
        return f"the download of {what} was interrupted ({_first_line(exc)}); run the command again"
    return f"downloading {what} failed: {_first_line(exc)}"


def _unreachable(exc: BaseException) -> str:
    """'the Hub at URL cannot be reached (why)', or 'the Hub answered HTTP 503'."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status:
        return f"the Hub answered HTTP {status}"
    return f"the Hub at {_endpoint_url()} cannot be reached ({_first_line(_root_cause(exc))})"


def _offline() -> bool:
    from huggingface_hub import constants

    return (_settings.offline or bool(getattr(constants, "HF_HUB_OFFLINE", False))
            or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now; None leaves huggingface_hub's own (read at its import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _endpoint_url() -> str:
    """The Hub's address as requests go to it, for messages."""
    from huggingface_hub import constants

    return _endpoint() or str(constants.ENDPOINT).rstrip("/")


def _has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def hub_cache_folder(hub_id: HubId) -> Path:
    """The repository's folder in the local cache (every revision's snapshot and blob), whether or not it exists."""
    return cache_dir() / _repo_folder(hub_id.repo_id)


def _listing(hub_id: HubId) -> _Listing:
    """The commit the revision names now, and its files with sizes: one request per process and revision."""
    key = (_endpoint() or "", str(cache_dir()), hub_id.repo_id, hub_id.revision or "main")
    if key not in _listings:
        from huggingface_hub import HfApi

        info = HfApi(endpoint=_endpoint()).model_info(hub_id.repo_id, revision=hub_id.revision, files_metadata=True)
        if not info.sha:
            raise DeltakitError(f"{hub_id}: the Hub did not say which commit this revision is")
        sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
        _listings[key] = _Listing(commit=info.sha, sizes=sizes)
    return _listings[key]


def _cached_snapshot(hub_id: HubId) -> Path | None:
    """The cached snapshot folder of the revision (a commit, or a branch/tag recorded in refs/), if any."""
    repo = cache_dir() / _repo_folder(hub_id.repo_id)
    revision = hub_id.revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None or not (repo / "snapshots" / commit).is_dir():
        return None
    return repo / "snapshots" / commit


def _from_cache(hub_id: HubId, allow_pickle: bool, weights: bool, reason: str) -> Path:
    """The cached snapshot, checked to hold what the command reads."""
    folder = _cached_snapshot(hub_id)
    if folder is None:
        raise DeltakitError(_not_cached(hub_id, reason))
    present: dict[str, int | None] = {p.name: None for p in folder.iterdir() if p.is_file()}
    partly = f"{hub_id} is only partly in the local Hugging Face cache ({folder}) and {reason}"
    try:
        wanted = choose_files(present, allow_pickle, weights, str(hub_id))
    except DeltakitError as exc:
        if "PyTorch pickles" in str(exc):
            raise
        raise DeltakitError(f"{partly}: it holds no weights") from None
    index = next((name for name in wanted if name in (SAFETENSORS_INDEX, PICKLE_INDEX)), None)
    if index is not None:
        try:
            shards_of(folder / index, present, str(hub_id))
        except DeltakitError as exc:
            raise DeltakitError(f"{partly}: {str(exc).removeprefix(f'{hub_id}: ')}") from None
    return folder


def _not_cached(hub_id: HubId, reason: str) -> str:
    return f"{hub_id} is not in the local Hugging Face cache ({cache_dir()}) and {reason}"


def _download(hub_id: HubId, listing: _Listing, folder: Path, names: list[str]) -> None:
    """Fetch ``names`` (those not in ``folder`` yet) at the listing's commit, announcing a large total first."""
    missing = [name for name in names if not (folder / name).exists()]
    if not missing:
        _record_ref(hub_id, listing.commit)
        return
    total = sum(listing.sizes.get(name) or 0 for name in missing)
    free = _free_bytes(cache_dir())
    if free is not None and total > free:
        raise DeltakitError(f"downloading {hub_id} needs {_human(total)} in {cache_dir()}, which has {_human(free)} "
                            "free: free some space, or point HF_HUB_CACHE at a larger disk")
    if _settings.progress and total >= LARGE_DOWNLOAD_BYTES:
        print(f"downloading {hub_id} (commit {listing.commit[:10]}): {len(missing)} files, {_human(total)} "
              f"into {cache_dir()}", file=sys.stderr, flush=True)
    from huggingface_hub import hf_hub_download

    bars = _settings.progress and sys.stderr.isatty()
    for name in missing:
        try:
            with _hub_warnings_muted():
                hf_hub_download(hub_id.repo_id, name, revision=listing.commit, cache_dir=cache_dir(),
                                endpoint=_endpoint(), tqdm_class=None if bars else _silent_tqdm())
        except Exception as exc:  # noqa: BLE001 - one line per failure
            raise DeltakitError(hub_error_message(exc, hub_id, name)) from None
    _record_ref(hub_id, listing.commit)


@contextlib.contextmanager
def _hub_warnings_muted() -> Iterator[None]:
    """huggingface_hub's own warnings (a resumed transfer, a retry) off stderr: a failure is reported once, by us."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _record_ref(hub_id: HubId, commit: str) -> None:
    """Write refs/<revision> -> commit (the cache's own layout) so --offline finds this revision later.

    Downloads are made at the commit itself, which huggingface_hub records under no ref.
    """
    revision = hub_id.revision or "main"
    if revision == commit:
        return
    ref = cache_dir() / _repo_folder(hub_id.repo_id) / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds (or will hold) ``folder``; None when it cannot be told."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _human(nbytes: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _root_cause(exc: BaseException) -> BaseException:
    return list(_causes(exc))[-1]


def _is_connection_error(exc: BaseException) -> bool:
    """No route to the Hub: refused, unresolvable, timed out (httpx, requests or the OS said so)."""
    from huggingface_hub import errors

    for cause in _causes(exc):
        if isinstance(cause, errors.OfflineModeIsEnabled):
            return False
        names = {cls.__name__ for cls in type(cause).__mro__}
        if names & {"ConnectError", "ConnectTimeout", "ConnectionRefusedError", "TimeoutException", "ProxyError",
                    "NameResolutionError", "gaierror"}:
            return True
    return False


def _is_interruption(exc: BaseException) -> bool:
    for cause in _causes(exc):
        names = {cls.__name__ for cls in type(cause).__mro__}
        if names & {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead"}:
            return True
    return "Consistency check failed" in str(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
