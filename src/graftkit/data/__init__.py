"""Local data: packaged text corpora and splits (see :mod:`graftkit.data.corpora`)."""
from __future__ import annotations

from .corpora import BBC_NEWS_CLASSES, CORPORA, bbc_news, labels_of, package_data_dir, stratified_split

__all__ = ["BBC_NEWS_CLASSES", "CORPORA", "bbc_news", "labels_of", "package_data_dir", "stratified_split"]
