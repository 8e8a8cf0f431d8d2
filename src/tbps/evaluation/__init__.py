"""Evaluation: retrieval metrics (R@k, mAP, mINP) and generic re-ranking of similarity matrices."""

from tbps.evaluation.rank import RECALL_RANKS, rank, rank_both
from tbps.evaluation.rerank import rvn_rerank, two_stage_similarity

__all__ = ["RECALL_RANKS", "rank", "rank_both", "rvn_rerank", "two_stage_similarity"]
