"""Column names of the Parquet contracts between stages, defined once (see ARCHITECTURE.md)."""

IMAGE_ID = "image_id"
SOURCE = "source"
LABEL = "label"
VIEW = "view"
BOX = ("x0", "y0", "x1", "y1")
FLIP = "flip"
LOGITS = "logits"
FEATURES = "features"
QUERY_ID = "query_id"
RANK = "rank"
SCORE = "score"
CROP_ID = "crop_id"
EMBEDDING = "embedding"

UNLABELED = -1
