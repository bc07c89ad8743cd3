"""The data layer: box features, questions and answers, scene graphs, the demo world, and collation.

Submodules are imported explicitly (`from isubg.data.features import FeatureStore`); this package
file imports nothing so that `isubg` commands which never touch data stay fast.
"""
