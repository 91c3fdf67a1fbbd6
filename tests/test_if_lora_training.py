"""DreamBooth-LoRA on the tiny IF stage I: the training YAML puts LoRA on every added-key/value attention projection."""
from pathlib import Path

from gm.modules.diffusionmodules.if_layers import AddedKVAttention
from gm.modules.lora import LoRADense, lora_parameters
from gm.util import instantiate_from_config
from mindbooth.config import load_config
from test_t5 import spiece_model  # noqa: F401  (a fixture: a small T5 SentencePiece model)

TRAINING = Path(__file__).resolve().parents[1] / "configs" / "training" / "if_i_tiny_dreambooth_lora_cpu.yaml"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def test_if_training_yaml_puts_lora_on_all_six_projections_of_every_attention(spiece_model):  # noqa: F811
    config = load_config(TRAINING)
    config.model.params.conditioner_config.params.emb_models[0].params.tokenizer_file = str(spiece_model)
    engine = instantiate_from_config(config.model)
    attentions = [(name, cell) for name, cell in engine.model.cells_and_names() if isinstance(cell, AddedKVAttention)]
    assert attentions
    for name, cell in attentions:
        for target in TARGETS:
            layer = cell
            for part in target.split("."):
                layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
            assert isinstance(layer, LoRADense), f"{name}.{target}"
    names = lora_parameters(engine)
    assert len(names) == 2 * len(TARGETS) * len(attentions)  # lora_A and lora_B per projection
    assert all(p.requires_grad for p in names.values())
    assert any(".add_k_proj.lora_A." in n for n in names) and any(".add_v_proj.lora_B." in n for n in names)
