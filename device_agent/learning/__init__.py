"""Local private continual learning (NCSC 4.1, 4.2; ``docs/learning.md``).

Labelled feedback is kept on the board, encrypted under a key from the board secret; before any
of it is learnt it passes the filters (:mod:`.filters`); the model's marked final linear layer is
refitted in numpy (:mod:`.head`); the candidate is judged by the sealed gate (:mod:`.gate`) and,
accepted, becomes a local version recorded in an update log the board signs (:mod:`.store`).
:mod:`.policy` reads the sealed learning policy; :mod:`.cycle` runs one update cycle and the
review, rollback and intake operations over the agent.

Pure decisions (policy, filters, head, gate) take arrays and numbers and return values; only
:mod:`.store` and :mod:`.cycle` touch files.
"""
