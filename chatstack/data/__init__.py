"""chatstack.data"""
