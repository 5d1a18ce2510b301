"""ALS (Spark MLlib) from the interaction matrix, with the seconds spent in ALS.fit."""

from __future__ import annotations

import logging
import time

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame

from recsys.settings import Settings

log = logging.getLogger(__name__)


def als_params(settings: Settings) -> dict[str, str]:
    """The parameters a model was trained with, as `ModelReady.params` carries them."""
    return {
        "als_mode": settings.als_mode,
        "rank": str(settings.als_rank),
        "max_iter": str(settings.als_max_iter),
        "reg_param": str(settings.als_reg_param),
        "alpha": str(settings.als_alpha),
        "confidence": settings.confidence,
        "seed": str(settings.seed),
        # rank, reg and alpha above were chosen by spark.tune on this cycle's train side
        "tuned": str(settings.tune_before_train).lower(),
    }


def build_als(settings: Settings, blocks: int) -> ALS:
    """The estimator; cold-start rows (ids unseen in training) are dropped from predictions."""
    return ALS(
        userCol="user",
        itemCol="item",
        ratingCol="rating",
        rank=settings.als_rank,
        maxIter=settings.als_max_iter,
        regParam=settings.als_reg_param,
        alpha=settings.als_alpha,
        implicitPrefs=settings.als_mode == "implicit",
        nonnegative=False,
        seed=settings.seed,
        coldStartStrategy="drop",
        # Few blocks: on a few cores, more blocks add shuffle overhead without parallelism.
        numUserBlocks=blocks,
        numItemBlocks=blocks,
    )


def fit(matrix: DataFrame, settings: Settings) -> tuple[ALSModel, float]:
    """Fit ALS; the matrix should be cached so the seconds count ALS only."""
    spark = matrix.sparkSession
    blocks = max(2, int(spark.sparkContext.defaultParallelism))
    als = build_als(settings, blocks)
    started = time.perf_counter()
    model = als.fit(matrix)
    seconds = time.perf_counter() - started
    log.info(
        "ALS.fit %.1f s (rank %d, %d iterations, reg %g, alpha %g, %s)",
        seconds, settings.als_rank, settings.als_max_iter, settings.als_reg_param,
        settings.als_alpha, settings.als_mode,
    )
    return model, seconds
