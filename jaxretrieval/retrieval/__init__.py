from jaxretrieval.retrieval.centroids import (
    MIXED_CAMERA,
    CentroidBlock,
    centroid_gallery,
    centroid_scores,
    evaluate_reid,
    l2_normalize,
)
from jaxretrieval.retrieval.embed import embed_all
from jaxretrieval.retrieval.index import GalleryIndex
from jaxretrieval.retrieval.metrics import (
    JUNK_PID,
    ReidQueryResults,
    best_rank,
    coco_recall,
    image_text_recall,
    ranking_metrics,
    recall_table,
    reid_metrics,
    reid_query_results,
    summarize_reid,
)
from jaxretrieval.retrieval.rerank import rerank, rerank_matrix

__all__ = [
    "JUNK_PID", "MIXED_CAMERA", "CentroidBlock", "GalleryIndex", "ReidQueryResults", "best_rank", "centroid_gallery",
    "centroid_scores", "coco_recall", "embed_all", "evaluate_reid", "image_text_recall", "l2_normalize",
    "ranking_metrics", "recall_table", "reid_metrics", "reid_query_results", "rerank", "rerank_matrix",
    "summarize_reid",
]
