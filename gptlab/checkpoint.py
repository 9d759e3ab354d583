"""Exports in Hugging Face format."""
from pathlib import Path


def export_hf(model, tokenizer, out_dir: Path) -> Path:
    """save_pretrained (safetensors) plus the tokenizer: loadable by from_pretrained and pipeline()."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
