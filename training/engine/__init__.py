"""Training loops: the Trainer (the only owner of run-folder bookkeeping), SAK stage 1 on top of it, loss weighting
(EW, DB-MTL, STCH) and distributed helpers."""
