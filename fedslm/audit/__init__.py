"""Empirical privacy audit: what a trained adapter actually leaks, beside what epsilon promises.

``metrics``: exposure, ROC AUC, TPR at a fixed FPR, the epsilon lower bound an attack
implies; ``canaries``: secret sequences planted in chosen clients' training texts;
``attack``: scores a model gives canaries and member/non-member records. Plain
functions; the server (``fedslm.server.audit``) and ``fedslm.simulations.audit`` call them.
"""
