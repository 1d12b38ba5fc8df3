"""A certification loop that mirrors locuslab/smoothing's ``Smooth._sample_noise``.

The baseline arq is measured against: repeat the input, ``randn_like`` noise,
forward, argmax, ``.cpu().numpy()`` every batch, and a Python counting loop.
"""
import numpy as np
import torch


def count_arr(arr, length):
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def locuslab_sample_noise(model, x, num, batch_size, num_classes, sigma):
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        while remaining:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += count_arr(predictions.cpu().numpy(), num_classes)
        return counts
