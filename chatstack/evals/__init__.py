"""chatstack.evals"""
