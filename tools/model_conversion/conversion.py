"""Model weights (SDXL base, SSD-1B, SD 1.x, SD 2.x): official `.safetensors` (or a diffusers folder) <->
MindSpore `.ckpt`.

Every conversion maps by name (official file names <-> the model's sgm names: `file_layout`; sgm <-> MindSpore
names: `keymap`) and checks the whole key set and every shape against `expected`,
the {MindSpore name: shape} of the model the checkpoint is for (see `sdxl_layout`). It streams one
tensor at a time into a temporary file of its own (`.<output>.partial-<pid>.<random>`) and gives it the output's
name at the very end, so an interrupted run never leaves a file that looks complete, and two runs writing the same
output never write into one file.

`expected` is either that dict, checked before anything is written, or a function that returns it
(for a config not built of the shipped configs' modules, the command line builds the model in another process, about
5 s, while the tensors are written).
Then a file that is not of a supported family, or not of `family` (the config's, where the rules give it), is
refused at once, and the exact check runs after
writing, before the output appears: a mismatch still leaves no output.
"""
import ctypes
import functools
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from mindbooth.ckpt_stream import CkptReader, CkptWriter
from mindbooth.tensor_dtypes import CHOICES, FLOATS, ConversionError, cast, itemsize
from tools.model_conversion.diffusers_folder import DiffusersFolder, materialize
from tools.model_conversion.file_layout import FAMILIES, detect, file_names, model_name, select
from tools.model_conversion.keymap import mindspore_to_official_name, official_to_mindspore_names
from tools.model_conversion.safetensors_stream import SafetensorsReader, TensorInfo, write_safetensors

FIRST = 5  # how many names an error lists


def _first(names):
    names = list(names)
    return ", ".join(names[:FIRST]) + (", ..." if len(names) > FIRST else "")


def official_expectation(expected: dict) -> dict:
    """{MindSpore name: shape} -> {official file name: (MindSpore name, shape)}."""
    out = {}
    for ms_name, shape in expected.items():
        official = mindspore_to_official_name(ms_name)
        if official in out:
            raise ConversionError(f"model parameters '{out[official][0]}' and '{ms_name}' map to the same name")
        out[official] = (ms_name, tuple(shape))
    in_file = file_names(out)
    return {in_file[name]: entry for name, entry in out.items()}


def file_to_mindspore_names(found: dict) -> dict:
    """{official file name: shape} -> {file name: MindSpore name} (file -> sgm -> MindSpore names)."""
    sgm = {name: model_name(name) for name in found}
    renamed = official_to_mindspore_names({sgm[name]: shape for name, shape in found.items()})
    return {name: renamed[sgm[name]] for name in found}


def _wrong_family(source, kind, model_kind):
    """The error for a file of one supported family given to the model of another, or None."""
    if kind in FAMILIES and model_kind in FAMILIES and kind != model_kind:
        return ConversionError(f"{source} looks like {kind}, not {model_kind}: pass --config {FAMILIES[kind]}")
    return None


def check_keys(found: dict, expected: dict, source: str, layout: str):
    """Raise one clear error unless `found` {name: shape} is exactly `expected` {name: shape}.

    `layout` names the layout of both ("official" or "MindSpore"), for the message. For official names
    the message says what the file looks like when it is some other model."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return
    kind, model_kind = _kind(found, layout), _kind(expected, layout)
    family_error = _wrong_family(source, kind, model_kind)
    if family_error:
        raise family_error
    what = "" if kind == model_kind else f"{source} looks like {kind}, not {model_kind}: "
    if missing or unexpected:
        problem = (f"{len(missing)} {layout} keys missing (first: {_first(missing) or '-'}), "
                   f"{len(unexpected)} unexpected (first: {_first(unexpected) or '-'})")
    else:
        problem = f"{len(wrong)} tensors have the wrong shape (first: " + ", ".join(
            f"{n} is {tuple(found[n])}, expected {tuple(expected[n])}" for n in wrong[:FIRST]) + ")"
    raise ConversionError((what or f"{source} does not match {model_kind}: ") + problem)


def _kind(found: dict, layout: str) -> str:
    """What `detect` says of a key set given in official file names or in MindSpore names."""
    if layout == "official":
        return detect(found)
    sgm = {mindspore_to_official_name(n): s for n, s in found.items()}
    in_file = file_names(sgm)
    return detect({in_file[n]: s for n, s in sgm.items()})


def check_layout(found: dict, source: str, layout: str, family=None):
    """Before the model's exact names and shapes are known: refuse at once a file that is no supported model, or
    one of another family than `family` (the config's, when known)."""
    kind = _kind(found, layout)
    if kind not in FAMILIES:
        raise ConversionError(f"{source} looks like {kind}, not " + (family or "a supported model (" + ", ".join(
            FAMILIES) + ")"))
    family_error = _wrong_family(source, kind, family)
    if family_error:
        raise family_error


def check_official(found: dict, mindspore_names: dict, expected: dict, source: str):
    """`found` {official name: shape} is exactly the model's (`expected`, MindSpore names), and `mindspore_names`
    {official: MindSpore name}, the names being written, are the model's own."""
    want = official_expectation(expected)
    check_keys(found, {n: s for n, (_, s) in want.items()}, source, "official")
    renamed = [n for n, (ms_name, _) in want.items() if mindspore_names[n] != ms_name]
    if renamed:
        raise ConversionError(f"{source}: the model names these parameters differently: " + ", ".join(
            f"{n} -> {want[n][0]}, not {mindspore_names[n]}" for n in renamed[:FIRST]))


def _resolve(expected) -> dict:
    return expected() if callable(expected) else expected


def _check_now_or_before_publishing(expected, check_only, check_layout_now, check_exact):
    """Run `check_exact(model's {name: shape})` now when `expected` is at hand (a dict, or --check waits for it)
    and return None; otherwise run `check_layout_now()` and return the exact check, for `atomic_output(verify=)`."""
    if callable(expected) and not check_only:
        check_layout_now()
        return lambda: check_exact(expected())
    check_exact(_resolve(expected))
    return None


def _target_dtype(dtype: str, source_code: str) -> str:
    if dtype not in CHOICES:
        raise ConversionError(f"unknown --dtype {dtype!r}: choose one of {', '.join(CHOICES)}")
    return CHOICES[dtype] or source_code


def _check_float(name, code, source):
    if code not in FLOATS:
        raise ConversionError(f"{source}: '{name}' is {code}; model weights are floating point")


def check_output(path, overwrite: bool, inputs=(), probe: bool = True):
    """Fail early (before any work) when the output may not be written; with `probe`, also when its folder cannot
    be made or written (tried with an empty folder, removed at once)."""
    from mindbooth.validation import UsageError, check_writable_folder

    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"output is a directory: {path}")
    if path.exists() and not overwrite:
        raise ConversionError(f"output exists: {path} (pass --overwrite to replace it)")
    for src in inputs:
        if path.exists() and os.path.samefile(src, path):
            raise ConversionError(f"output {path} is the input file")
    if probe:
        try:
            check_writable_folder(path.absolute().parent, "output folder")
        except UsageError as error:
            raise ConversionError(str(error)) from None


WRITE_BEHIND_SECONDS = 0.25
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the range's dirty pages, do not wait for them


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    """glibc's sync_file_range(fd, offset, nbytes, flags), or None where there is none (not Linux)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


@contextmanager
def write_behind(fd: int):
    """While the block runs, every WRITE_BEHIND_SECONDS, have the kernel start writing the file's dirty pages to
    disk without waiting for them: the disk then works while the conversion goes on, and the fsync at the end
    waits only for the last of it (left to itself, the kernel starts only once gigabytes are dirty)."""
    start_writing = _sync_file_range()
    if start_writing is None:
        yield
        return
    finished = threading.Event()

    def run():
        while not finished.wait(WRITE_BEHIND_SECONDS):
            start_writing(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # 0, 0: the whole file; an error leaves it to fsync

    thread = threading.Thread(target=run, name="write-behind", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


@contextmanager
def atomic_output(path, overwrite: bool, inputs=(), verify=None):
    """Yield a binary file that becomes `path` only if the block finishes (and `verify()`, if given, returns),
    written to disk (fsync) before it is given the name. The file has a name of its own until then, so two
    conversions to one output never write into one file; without `overwrite` the name is taken only if it is
    free, and the file under the name is checked to be this one."""
    path = Path(path)
    check_output(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}.")
    try:
        with open(handle, "wb") as f, write_behind(f.fileno()):
            yield f
            if verify is not None:
                verify()
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> a normal file
            ours = os.fstat(f.fileno())
        _publish(partial, path, overwrite)
        published = os.stat(path)
        if (published.st_dev, published.st_ino) != (ours.st_dev, ours.st_ino):
            raise ConversionError(f"{path} was replaced by another process while this conversion finished; run it again")
    finally:
        Path(partial).unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publish(partial, path: Path, overwrite: bool):
    """Give the finished file `partial` the name `path`: replacing a file there only with `overwrite`."""
    if overwrite:
        os.replace(partial, path)
        return
    try:
        try:
            os.link(partial, path)  # fails if the name is taken (another conversion finished first)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: take the name exclusively, then fill it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            os.replace(partial, path)
    except FileExistsError:
        raise ConversionError(f"output exists: {path} (another process wrote it meanwhile; "
                              "pass --overwrite to replace it)") from None


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


def _sniff(path) -> str:
    """'safetensors', 'ckpt' or '' from a file's first bytes (for 'wrong --task' hints)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return ""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    # a .ckpt starts with Checkpoint.value (0x0a, length varint) whose first field is Value.tag (0x0a)
    at = 1
    while at < len(head) and head[at] & 0x80:
        at += 1
    return "ckpt" if head[:1] == b"\x0a" and head[at + 1:at + 2] == b"\x0a" else ""


def _stream_to_ckpt(entries, dst, dtype, overwrite, progress, desc, inputs, check_only, verify=None):
    """entries: [(MindSpore name, source code, shape, load() -> (data, code), where)] -> `.ckpt` at dst.
    `where` is (file descriptor, offset) of the source bytes, or None: a tensor whose element type does not
    change is then copied by the kernel, as `cp` copies, instead of being read and written."""
    targets = [_target_dtype(dtype, code) for _, code, _, _, _ in entries]
    total = sum(int(_numel(shape)) * itemsize(t) for (_, _, shape, _, _), t in zip(entries, targets))
    if check_only:
        return {"tensors": len(entries), "bytes": total, "seconds": 0.0, "written": False,
                "names": [e[0] for e in entries]}
    start = time.time()
    with atomic_output(dst, overwrite, inputs, verify) as f, _progress(total, desc, progress) as bar:
        writer = CkptWriter(f)
        for (ms_name, code, shape, load, where), target in zip(entries, targets):
            nbytes = int(_numel(shape)) * itemsize(target)
            if where is not None and code == target:
                writer.copy(ms_name, target, shape, *where, nbytes)
            else:
                data, code = load()
                writer.write(ms_name, target, cast(data, code, target).reshape(shape))
            bar.update(nbytes)
    return {"tensors": len(entries), "bytes": total, "seconds": time.time() - start, "written": True}


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def official_to_mindspore(src, dst, expected, dtype="fp32", overwrite=False, progress=True, check_only=False,
                          family=None):
    """Official single-file `.safetensors` -> MindSpore `.ckpt` with the names of `expected` (a dict, or a
    function returning it: see the module's docstring). `check_only`: validate everything, write nothing.
    Tensors no model parameter takes (EMA, DDPM buffers, ...: `file_layout.select`) are skipped; the summary's
    `note` says which."""
    check_output(dst, overwrite or check_only, [src], probe=not check_only)
    if _sniff(src) == "ckpt":
        raise ConversionError(f"not a safetensors file: {src} (it looks like a MindSpore .ckpt: use --task ms_to_pt)")
    with SafetensorsReader(src) as reader:
        found, note = select(reader.shapes())
        names = file_to_mindspore_names(found)
        verify = _check_now_or_before_publishing(
            expected, check_only, lambda: check_layout(found, str(src), "official", family),
            lambda model: check_official(found, names, model, str(src)))
        kept = [t for t in reader.in_file_order() if t.name in found]  # sequential reads
        for t in kept:
            _check_float(t.name, t.dtype, src)
        entries = [(names[t.name], t.dtype, t.shape, lambda n=t.name, c=t.dtype: (reader.read(n), c),
                    (reader.fileno(), t.offset)) for t in kept]
        summary = _stream_to_ckpt(entries, dst, dtype, overwrite, progress, "pt_to_ms", [src], check_only, verify)
        return dict(summary, note=note)


def diffusers_to_mindspore(folder, dst, expected: dict, dtype="fp32", overwrite=False, progress=True, variant=None,
                           check_only=False):
    """diffusers pipeline folder -> MindSpore `.ckpt` (via the official file names, checked as a single file is)."""
    check_output(dst, overwrite or check_only, probe=not check_only)
    model = _resolve(expected)
    with DiffusersFolder(folder, variant) as pipe:
        found = pipe.shapes()
        names = file_to_mindspore_names(found)
        check_official(found, names, model, str(folder))
        keep = pipe.source_dtype() if dtype == "keep" else None
        entries = []
        for name, value in pipe.state.items():
            code = keep or "F32"
            entries.append((names[name], code, found[name], lambda v=value: materialize(v), None))
        summary = _stream_to_ckpt(entries, dst, dtype, overwrite, progress, "diffusers_to_ms", [], check_only)
        return dict(summary, note="")


def mindspore_to_official(src, dst, expected, dtype="fp32", overwrite=False, progress=True, check_only=False,
                          family=None):
    """MindSpore `.ckpt` -> official single-file `.safetensors` (laid out as the safetensors library does), in the
    names the family's released files use. `expected`: a dict, or a function returning it (see the module's
    docstring)."""
    check_output(dst, overwrite or check_only, [src], probe=not check_only)
    if _sniff(src) == "safetensors":
        raise ConversionError(f"not a MindSpore checkpoint: {src} (it is a safetensors file: use --task pt_to_ms)")
    with CkptReader(src) as reader:
        found = reader.shapes()
        verify = _check_now_or_before_publishing(
            expected, check_only, lambda: check_layout(found, str(src), "MindSpore", family),
            lambda model: check_keys(found, {n: tuple(s) for n, s in model.items()}, str(src), "MindSpore"))
        infos, sources = [], {}
        in_file = file_names(mindspore_to_official_name(n) for n in reader.tensors)
        for t in reader.tensors.values():
            _check_float(t.name, t.dtype, src)
            official = in_file[mindspore_to_official_name(t.name)]
            infos.append(TensorInfo(official, _target_dtype(dtype, t.dtype), t.shape))
            sources[official] = t
        start, total = time.time(), sum(i.nbytes for i in infos)
        if check_only:
            return {"tensors": len(infos), "bytes": total, "seconds": 0.0, "written": False,
                    "names": [i.name for i in infos], "note": ""}
        targets = {i.name: i.dtype for i in infos}

        def fetch(name):
            t = sources[name]
            return cast(reader.read(t.name), t.dtype, targets[name])

        def where(name):  # a tensor in one piece whose element type does not change: copied by the kernel
            t = sources[name]
            return (reader.fileno(), t.pieces[0][0]) if len(t.pieces) == 1 and t.dtype == targets[name] else None

        with atomic_output(dst, overwrite, [src], verify) as f, _progress(total, "ms_to_pt", progress) as bar:
            write_safetensors(f, infos, fetch, progress=bar, where=where)
        return {"tensors": len(infos), "bytes": total, "seconds": time.time() - start, "written": True, "note": ""}
