"""The model card (README.md) written beside exported weights, and the Hub metadata it carries."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from mom_lit.config import MoMConfig

LIBRARY_NAME = "mom_lit"
LICENSE = "apache-2.0"
PIPELINE_TAG = "text-generation"
TAGS = ["mom_lit", "mixture-of-memories", "linear-attention", "gated-deltanet"]

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A Mixture-of-Memories (MoM) causal language model trained with `mom_lit`: {{ summary }}.

| | |
|---|---|
| parameters | {{ num_parameters }} |
| layers x hidden size | {{ num_layers }} x {{ hidden_size }} |
| memories | {{ memories }} |
| update rule | {{ update_rule }} |
| vocabulary | {{ vocab_size }} |
| tokenizer | {{ tokenizer }} |

`config.json` holds every `MoMConfig` field; `model.safetensors` the weights{{ tied_note }}.

```python
from mom_lit import MoMForCausalLM
from mom_lit.data import load_tokenizer

model = MoMForCausalLM.from_pretrained("{{ model_id }}")
tokenizer = load_tokenizer("{{ model_id }}")  # a local copy of this folder
```
"""


def _tokenizer_text(tokenizer: str | None) -> str:
    if tokenizer is None:
        return "not recorded"
    if tokenizer == "byte":
        return "byte-level (UTF-8 bytes 0-255, end-of-document 256; `tokenizer_config.json`)"
    if tokenizer == "tokenizer.json":
        return "Hugging Face `tokenizers` (`tokenizer.json`)"
    return f"`{tokenizer}` from the Hugging Face Hub"


def render_model_card(config: MoMConfig, num_parameters: int, tokenizer: str | None,
                      model_id: str = "path/to/this/folder") -> ModelCard:
    """The card of a model of ``config``; ``tokenizer`` is the entry recorded in ``config.json``."""
    if config.has_router:
        memories = f"{config.num_memories} routed (top-{config.topk})" + (" + 1 shared" if config.shared_memory else "")
        summary = "each token writes to and reads from its top-k memories, chosen by a router"
        title = "MoM language model"
    else:
        memories = "1" + (" + 1 shared" if config.shared_memory else "")
        summary = "a single-memory linear-recurrent model (no router)"
        title = "Single-memory language model"
    card_data = ModelCardData(library_name=LIBRARY_NAME, license=LICENSE, pipeline_tag=PIPELINE_TAG, tags=list(TAGS))
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, title=title, summary=summary, num_parameters=f"{num_parameters:,}",
        num_layers=config.num_layers, hidden_size=config.hidden_size, memories=memories,
        update_rule=config.update_rule, vocab_size=config.vocab_size, tokenizer=_tokenizer_text(tokenizer),
        tied_note=" (the LM head is tied to the embedding and stored once)" if config.tie_embeddings else "",
        model_id=model_id)
