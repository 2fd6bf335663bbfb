"""chatstack.serve"""
