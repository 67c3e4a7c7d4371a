"""The scheduler service: time triggers (cron and working-day schedules) and the decisions of when they fire."""
