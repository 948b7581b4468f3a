"""An independent, literal transcription of the official Conv2Former forward pass, used only by the tests.

It spells every operation out the way the official release computes it (channels-first LayerNorm written with
explicit mean/variance, the Hadamard product, head before pooling), with the same parameter names, so that a
state_dict can be loaded into both this and ``conv2former.model`` and the outputs compared.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RefModulation(nn.Module):
    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.norm = ChannelsFirstLayerNorm(dim)
        self.att = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim))
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.proj(self.att(x) * self.v(x))


class RefMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelsFirstLayerNorm(dim)
        self.fc1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pos = nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4 * dim)
        self.fc2 = nn.Conv2d(4 * dim, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class RefBlock(nn.Module):
    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.attn = RefModulation(dim, k)
        self.mlp = RefMLP(dim)
        self.layer_scale_1 = nn.Parameter(1e-6 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.attn(x)
        return x + self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(x)


class RefConv2Former(nn.Module):
    def __init__(self, dims: Sequence[int], depths: Sequence[int], k: int, num_classes: int = 1000) -> None:
        super().__init__()
        half = dims[0] // 2
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
                    nn.GELU(),
                    nn.BatchNorm2d(half),
                    nn.Conv2d(half, half, 3, padding=1, bias=False),
                    nn.GELU(),
                    nn.BatchNorm2d(half),
                    nn.Conv2d(half, dims[0], 2, stride=2, bias=False),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )
        self.stages = nn.ModuleList(nn.Sequential(*[RefBlock(d, k) for _ in range(n)]) for d, n in zip(dims, depths))
        self.head = nn.Sequential(nn.Conv2d(dims[-1], 1280, 1), nn.GELU(), ChannelsFirstLayerNorm(1280))
        self.pred = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.pred(self.head(x).mean([-2, -1]))
