"""Learned components. The GCN predictor (keypoints -> hand mesh and parameters in milliseconds):

- ``hierarchy``: mesh hierarchy of the built-in hand (decimation, up/down-sampling, spirals);
- ``layers``: SpiralConv, DSConv, sparse resampling, skeleton graph conv (plain torch);
- ``gcn``: the mesh network; ``ik``: its swing-IK prior; ``lifter``: 2D -> 3D keypoint lifter;
- ``geometry``: input frames (palm frame, virtual crop camera) and 2D-1D registration;
- ``synthetic_pairs``: training / evaluation pairs drawn from the hand model;
- ``predictor``: ``GCNPredictor.load()`` -> ``predict_3d`` / ``predict_2d`` (world HandParams).
"""
