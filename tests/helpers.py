"Helpers shared by several test files (pytest puts this folder on `sys.path`)."
import torch


def lively(model, std=0.3, seed=0):
    "Random weights with a large spread: greedy output varies instead of repeating a token, so a wrong token shows."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
