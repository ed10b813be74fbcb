"""``eval report``: the run report (teacher vs student, metrics, sample grids) and its charts."""
