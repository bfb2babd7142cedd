"""The ``sksegcal`` command: extract, fit, evaluate, report, and the demo.

``sksegcal demo`` is the whole job on the embedded default (see
:mod:`sksegcal.datasets`): a small U-Net (trained once, cached), its logits on
held-out and shifted slices, a :class:`~sksegcal.store.LogitStore`, an
image-level split, temperature scaling, selective scaling (its defaults: t1 and
t2 fitted on held-out images, the guard against losing to TS) and
:class:`~sksegcal.CalibratorSearchCV` (the family's best by per-image NLL),
evaluation on the test images in and out of domain, and a report folder.

The other subcommands are the same steps for your own data::

    sksegcal extract --logits logits.npy --labels labels.npy --store my-store
    sksegcal fit my-store --method selective --output selective.skops
    sksegcal fit my-store --method temperature --output ts.skops
    sksegcal fit my-store --method search --output search.skops
    sksegcal evaluate my-store --calibrator ts.skops --calibrator selective.skops \\
        --output results
    sksegcal report results

``fit`` writes a skops file (``calibrator.skops`` by default), or a joblib
pickle when the output name ends in ``.joblib`` or ``.pkl``. Calibrators load through
:func:`sksegcal.persistence.load`: skops files always, pickles (which run any
code they contain) only with ``--trusted``.

Errors the user can fix (a missing file, a store with another class count, a
corrupt store) end the command with exit status 1 and one line on stderr;
usage errors with exit status 2 and one line; ``SKSEGCAL_DEBUG=1`` shows the
traceback instead.

Layout: :mod:`._main` (the parser and the dispatch), :mod:`._commands`
(extract, fit, evaluate, report), :mod:`._calibrate` (fitting and saving
calibrators, shared with the demo), :mod:`._demo` (the demo pipeline),
:mod:`._report` (tables, figures, report.md, saved results) and
:mod:`._common` (errors, inputs, outputs).
"""

from ._main import main

__all__ = ["main"]
