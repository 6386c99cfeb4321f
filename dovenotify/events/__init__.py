"""dovenotify.events"""
