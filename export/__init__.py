"""Writing results: meshes (``mesh_io``), hand parameters and keypoints (``params_io``), overlays
(``overlay``), two-hand scenes (``scene``), ``report.html`` (``report``), and the run's output
folder as a whole (``outputs``). Every write is atomic and refuses NaN (``atomic``)."""
