"""Config helpers in the style of Stability's generative-models (sgm)."""
import contextlib
import importlib
import os


def get_obj_from_str(string: str):
    """'pkg.module.Name' -> the object it names."""
    module, name = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config, **extra_params):
    """Build `target(**params)` from a `{target:, params:}` mapping (OmegaConf or dict)."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key: {dict(config) if hasattr(config, 'keys') else config}")
    params = dict(config.get("params", None) or {})
    params.update(extra_params)
    return get_obj_from_str(config["target"])(**params)


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set to `values` inside the block; each gets its previous value back (or is removed
    again) on leaving it. For switches that MindSpore or this project read when something is built or compiled."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def become(cell, cls):
    """Make the built `cell` an instance of `cls`, a subclass of its class that changes only how it computes (a
    low-precision weight cast at use, a backend's kernel). It stays the same object: its parameters, their names and
    its place in the model do not change, so checkpoints load as before. Returns the cell."""
    if not issubclass(cls, type(cell)):
        raise TypeError(f"{cls.__name__} is not a variant of {type(cell).__name__}")
    cell.__class__ = cls
    # What nn.Cell.__init__ reads from the class: PyNative calls a custom bprop only where has_bprop says so.
    object.__setattr__(cell, "has_bprop", hasattr(cell, "bprop"))
    return cell


def replace_child(parent, name: str, new):
    """Put `new` in `parent`'s place `name`: an attribute, or an index of a SequentialCell/CellList."""
    from mindspore import nn

    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def child(parent, name: str):
    """`parent`'s child `name`: an attribute, or an index of a SequentialCell/CellList."""
    from mindspore import nn

    return parent[int(name)] if isinstance(parent, (nn.SequentialCell, nn.CellList)) else getattr(parent, name)


def default(value, fallback):
    return fallback if value is None else value


def append_dims(x, target_ndim: int):
    """Append trailing singleton axes to `x` until it has `target_ndim` axes."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_ndim is {target_ndim}, which is less")
    return x.reshape(x.shape + (1,) * missing)


def load_params(net, params: dict, strict: bool = True, what: str = "checkpoint"):
    """Copy `params` (name -> numpy array / Tensor / Parameter) into `net`'s parameters by name.

    MindSpore's `load_param_into_net(strict_load=True)` does not raise on missing or unexpected
    names (it returns them), so strictness is checked here. Returns (missing, unexpected).
    """
    import mindspore as ms

    own = dict(net.parameters_and_names())
    missing = sorted(set(own) - set(params))
    unexpected = sorted(set(params) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{what} does not match the model: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}); check that config and weights are the same model"
        )
    for name in set(own) & set(params):
        value = params[name]
        if isinstance(value, ms.Parameter):
            value = value.value()
        param = own[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{what}: '{name}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        value = ms.Tensor(value) if not isinstance(value, ms.Tensor) else value
        param.set_data(value.astype(param.dtype))
    return missing, unexpected
