"""Parameter-name rules between the official SDXL checkpoint layout ("original", as in
`sd_xl_base_1.0.safetensors`) and MindSpore names (MindONE's naming).

The two layouts differ only in how MindSpore names norm and embedding parameters:
a norm's 1-D `weight`/`bias` are `gamma`/`beta`, an `nn.Embedding` table is `embedding_table`.
"""

EMBEDDING_SUFFIXES = ("token_embedding.weight", "position_embedding.weight")


def official_to_mindspore_names(shapes: dict) -> dict:
    """{official name: shape} -> {official name: MindSpore name}.

    A `.weight` with one axis is a norm's scale; its sibling `.bias` is the norm's shift.
    """
    norm_layers = {name[: -len(".weight")] for name, shape in shapes.items() if name.endswith(".weight") and len(shape) == 1}
    renamed = {}
    for name in shapes:
        if name.endswith(EMBEDDING_SUFFIXES):
            renamed[name] = name[: -len("weight")] + "embedding_table"
        elif name.endswith(".weight") and name[: -len(".weight")] in norm_layers:
            renamed[name] = name[: -len("weight")] + "gamma"
        elif name.endswith(".bias") and name[: -len(".bias")] in norm_layers:
            renamed[name] = name[: -len("bias")] + "beta"
        else:
            renamed[name] = name
    return renamed


def mindspore_to_official_name(name: str) -> str:
    """The inverse rename needs no shapes: MindSpore's names say what they are."""
    if name.endswith(".embedding_table"):
        return name[: -len("embedding_table")] + "weight"
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name
