// openTap, tapSetOffload, configureInterface: tap devices and their host side (tap.cc).
#pragma once

#include <napi.h>

namespace tern {

void InitTap(Napi::Env env, Napi::Object exports);

}  // namespace tern
