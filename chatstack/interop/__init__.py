"""chatstack.interop"""
