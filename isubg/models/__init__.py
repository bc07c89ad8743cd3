"""The models: three branches (cfrf, isubg, xvlm) and their per-answer fusion.

Branch modules are imported by `build_model`, not here, so importing the package stays cheap.
"""
