"""Text generation from a trained model."""
import torch


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, seed: int = 0, **sampling) -> str:
    """Decode with the tokenizer's own decoder, so byte-level BPE gives readable UTF-8."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    if enc["input_ids"].shape[1] == 0:  # an empty prompt starts from the document separator
        enc["input_ids"] = torch.tensor([[tokenizer.eos_token_id]], device=device)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    was_training = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         **({"do_sample": True, "top_k": 50} | sampling))
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
