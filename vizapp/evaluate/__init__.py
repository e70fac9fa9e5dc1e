"""One evaluation command for a laptop or a Ray cluster, with identical results.

``python -m vizapp.evaluate DATA --model NAME --methods rollout,grad_rollout,relevance,attention,flow,random``
runs the perturbation test of Chefer et al. 2021, vizapp's deletion/insertion curves and per-head statistics (mean
attention distance, attention entropy, token norms) in one pass over DATA, and writes ``results.csv`` (one row per
image), ``summary.md``, ``summary.json`` and ``curves.html`` under ``--out``.

``--protocol chefer2021`` (the default) is the authors' perturbation procedure: the map upsampled bilinearly to
pixels, the top int(f*H*W) pixels zeroed at f = 0.1 .. 0.9. ``--protocol patches`` is vizapp's variant that removes
whole patches. The protocol is recorded in every row and named in the summary. See docs/faithfulness.md for the
protocol and docs/scaling.md for the engines.

A windowed-attention model (Swin) offers its own maps, ``rollout``, ``flow``, ``grad_rollout``, ``relevance``,
``attnlrp``, ``legrad`` and ``last_layer`` (and ``random``), on its first stage's token grid: the ``chefer2021`` protocol upsamples them by that
stage's token spacing, and ``patches`` removes its tokens' pixels; its per-head columns are the heads each layer has.
"""

from vizapp.evaluate.run import evaluate, main

__all__ = ["evaluate", "main"]
