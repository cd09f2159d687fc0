"""Datasets for the DataLoader-worker tests, in a module of their own: spawn-started
workers import the module that defines the dataset, and this one imports only torch
and numpy (a test module would pull in everything it imports)."""
import os

import numpy as np
import torch


class ImagesIn(torch.utils.data.Dataset):
    """(worker pid, decoded RGB pixels) of each image reference."""

    def __init__(self, refs):
        self.refs = refs

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        from precompute.images import load_image
        return os.getpid(), torch.from_numpy(np.asarray(load_image(self.refs[i])).copy())


class TargetsOf(torch.utils.data.Dataset):
    """(worker pid, packed similarity, attention) of each key of a cache group."""

    def __init__(self, group, keys):
        self.group, self.keys = group, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        s, a = self.group.native_packed(self.keys[i])
        return os.getpid(), torch.from_numpy(s), torch.from_numpy(a)
