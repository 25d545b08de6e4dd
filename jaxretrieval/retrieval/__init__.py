from jaxretrieval.retrieval.embed import embed_all
from jaxretrieval.retrieval.metrics import best_rank, image_text_recall, recall_table

__all__ = ["best_rank", "embed_all", "image_text_recall", "recall_table"]
