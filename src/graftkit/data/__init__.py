"""Local data: packaged text corpora and splits (see :mod:`graftkit.data.corpora`)."""
from __future__ import annotations

from .corpora import (BBC_NEWS_CLASSES, CORPORA, bbc_news, labels_of, package_data_dir, rotten_tomatoes, stratified_split, text_key,
                      vader_amazon, vader_tweets)

__all__ = ["BBC_NEWS_CLASSES", "CORPORA", "bbc_news", "labels_of", "package_data_dir", "rotten_tomatoes", "stratified_split", "text_key",
           "vader_amazon", "vader_tweets"]
