"""chatstack.train"""
