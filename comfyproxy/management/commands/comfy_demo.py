"""Demo data for trying the system on one machine: a teacher and a small class."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from comfyproxy.models import QueueSettings

TEACHER = ("teacher", "teacher-demo")
STUDENT_PASSWORD = "student-demo"


class Command(BaseCommand):
    help = "Create (or reset the passwords of) a demo teacher and demo students."

    def add_arguments(self, parser):
        parser.add_argument("--students", type=int, default=5, help="How many students (student1..N).")

    def handle(self, *args, students, **options):
        user_model = get_user_model()
        teacher, _ = user_model.objects.get_or_create(username=TEACHER[0])
        teacher.is_staff = teacher.is_superuser = True
        teacher.set_password(TEACHER[1])
        teacher.save()
        for number in range(1, students + 1):
            student, _ = user_model.objects.get_or_create(username=f"student{number}")
            student.set_password(STUDENT_PASSWORD)
            student.save()
        QueueSettings.load()
        self.stdout.write(f"teacher: {TEACHER[0]} / {TEACHER[1]}")
        self.stdout.write(f"students: student1..student{students} / {STUDENT_PASSWORD}")
